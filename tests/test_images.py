"""Loading and validating input images: every bad input gets one clear error naming the file."""

import gzip

import nibabel as nb
import numpy as np
import pytest

from synthmorph_app.errors import InputImageError
from synthmorph_app.io.images import Geometry, load_image, save_image

RNG = np.random.default_rng(0)


def _write(tmp_path, data, name='img.nii.gz', affine=None):
    path = tmp_path / name
    nb.save(nb.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def test_load_valid_squeezes_singleton(tmp_path):
    path = _write(tmp_path, RNG.random((8, 9, 10, 1)).astype(np.float32))
    img = load_image(path)
    assert img.shape == (8, 9, 10)
    assert img.get_fdata().dtype == np.float64


def test_load_mgz_and_int_dtype(tmp_path):
    path = tmp_path / 'x.mgz'
    nb.save(nb.MGHImage((RNG.random((6, 7, 8)) * 200).astype(np.uint8), np.eye(4)), str(path))
    img = load_image(path)
    assert img.shape == (6, 7, 8)
    assert np.asanyarray(img.dataobj).dtype == np.float32


@pytest.mark.parametrize(
    'data,affine,message',
    [
        (RNG.random((8, 8, 8, 3)), None, '4 dimensions'),
        (RNG.random((8, 8)), None, '2 dimensions'),
        (RNG.random((8, 8, 1)), None, 'single slice'),
        (np.zeros((8, 8, 8)), None, 'single value'),
        (np.where(RNG.random((8, 8, 8)) > 0.5, np.nan, 1.0), None, 'NaN'),
        (np.where(RNG.random((8, 8, 8)) > 0.5, np.inf, 1.0), None, 'NaN or infinite'),
    ],
)
def test_bad_images(tmp_path, data, affine, message):
    path = _write(tmp_path, data.astype(np.float32), affine=affine)
    with pytest.raises(InputImageError, match=message) as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_singular_affine(tmp_path):
    img = nb.Nifti1Image(RNG.random((8, 8, 8)).astype(np.float32), np.eye(4))
    img.header['srow_z'] = 0  # nibabel refuses to write such a header, so patch the bytes
    img.header['qform_code'], img.header['sform_code'] = 0, 1
    path = tmp_path / 'singular.nii'
    path.write_bytes(img.header.binaryblock + bytes(4) + np.asarray(img.dataobj).tobytes())
    with pytest.raises(InputImageError, match='singular') as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_missing_unknown_and_corrupt(tmp_path):
    with pytest.raises(InputImageError, match='does not exist'):
        load_image(tmp_path / 'nope.nii.gz')
    unfetched = tmp_path / 'sub-01_T1w.nii.gz'  # a DataLad/git-annex file not fetched
    unfetched.symlink_to('.git/annex/objects/Xq/3v/MD5E-s1--x.nii.gz/MD5E-s1--x.nii.gz')
    with pytest.raises(InputImageError, match=r'a link to a file that does not exist \(\.git/'
                                              r'annex/.*\): .* fetch it first \(datalad get\)'):
        load_image(unfetched, kind='moving image')
    other = tmp_path / 'img.png'
    other.write_bytes(b'\x89PNG')
    with pytest.raises(InputImageError, match='unknown extension'):
        load_image(other)
    good = _write(tmp_path, RNG.random((16, 16, 16)).astype(np.float32))
    truncated = tmp_path / 'trunc.nii.gz'
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(InputImageError, match='cannot be read') as err:
        load_image(truncated)
    assert str(truncated) in str(err.value)
    garbage = tmp_path / 'garbage.nii.gz'
    garbage.write_bytes(gzip.compress(b'not a nifti header at all' * 20))
    with pytest.raises(InputImageError, match='cannot be read'):
        load_image(garbage)


def test_save_is_atomic_and_follows_extension(tmp_path):
    img = nb.Nifti1Image(RNG.random((5, 6, 7)).astype(np.float32), np.diag([2, 2, 2, 1.0]))
    for name in ('a.nii.gz', 'b.nii', 'c.mgz'):
        out = save_image(img, tmp_path / 'sub' / name)
        back = nb.load(str(out))
        assert np.allclose(back.affine, img.affine)
        assert np.allclose(np.asanyarray(back.dataobj), img.get_fdata(), atol=1e-6)
    assert not [p for p in (tmp_path / 'sub').iterdir() if '.tmp' in p.name]
    with pytest.raises(InputImageError, match='unknown extension'):
        save_image(img, tmp_path / 'x.jpg')


def test_geometry_equality_and_voxel_sizes():
    a = Geometry((4, 5, 6), np.diag([1.0, 2.0, 3.0, 1.0]))
    assert a == Geometry((4, 5, 6), np.diag([1.0, 2.0, 3.0, 1.0]) + 1e-9)
    assert a != Geometry((4, 5, 7), np.diag([1.0, 2.0, 3.0, 1.0]))
    assert np.allclose(a.voxel_sizes, [1, 2, 3])


def _raw_nifti(path, hdr, data):
    """Write a header as it is (nibabel would mend codes it thinks wrong on save)."""
    path.write_bytes(hdr.binaryblock + bytes(4) + np.asarray(data, np.float32).tobytes())
    return path


@pytest.mark.parametrize('codes', [(0, 0), (0, 9), (9, 0)])
def test_no_orientation_is_refused(tmp_path, codes):
    """Both codes 0, or an invalid code that nibabel resets to 0: the orientation is unknown."""
    data = RNG.random((8, 9, 10)).astype(np.float32)
    hdr = nb.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])).header
    hdr['qform_code'], hdr['sform_code'] = codes
    path = _raw_nifti(tmp_path / 'nocodes.nii', hdr, data)
    with pytest.raises(InputImageError, match='no orientation') as err:
        load_image(path, kind='moving image')
    assert str(path) in str(err.value) and 'moving image' in str(err.value)


def test_qform_and_sform_must_agree(tmp_path):
    data = RNG.random((8, 9, 10)).astype(np.float32)
    img = nb.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.set_qform(np.diag([-2.0, 2.0, 2.0, 1.0]), code=1)  # left-right flipped against the sform
    img.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    path = tmp_path / 'disagree.nii.gz'
    nb.save(img, str(path))
    with pytest.raises(InputImageError, match=r'qform \(LAS\) and an sform \(RAS\)') as err:
        load_image(path)
    assert str(path) in str(err.value)
    # one of the two set is enough, and a qform that agrees with the sform is fine
    for qform, qcode, scode in ((np.diag([-2.0, 2.0, 2.0, 1.0]), 1, 0),
                                (np.diag([2.0, 2.0, 2.0, 1.0]), 0, 1),
                                (np.diag([2.0, 2.0, 2.0, 1.0]) + 0.01 * np.eye(4), 1, 1)):
        img.set_qform(qform, code=qcode)
        img.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=scode)
        nb.save(img, str(path))
        assert load_image(path).shape == (8, 9, 10)


def test_colour_image_is_refused(tmp_path):
    rgb = np.zeros((8, 8, 8), dtype=[('R', 'u1'), ('G', 'u1'), ('B', 'u1')])
    rgb['G'] = 7
    path = tmp_path / 'rgb.nii.gz'
    nb.save(nb.Nifti1Image(rgb, np.eye(4)), str(path))
    with pytest.raises(InputImageError, match='colour') as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_misnamed_uncompressed_files_are_read_as_they_are(tmp_path, capfd):
    """A ``.nii.gz`` or ``.mgz`` that is not compressed (a converter or a copy dropped the
    compression) reads as ITK, ANTs and FSL read it; a file that is neither is one clear error
    naming it, without nibabel's header complaints about its wrong guesses."""
    data = (RNG.random((7, 8, 9)) * 100).astype(np.float32)
    affine = np.diag([-1.5, 1.5, 2.0, 1.0])
    for kind, name in ((nb.Nifti1Image, 'n1.nii'), (nb.Nifti2Image, 'n2.nii'),
                       (nb.MGHImage, 'm.mgh')):
        plain = tmp_path / name
        nb.save(kind(data, affine), str(plain))
        misnamed = tmp_path / (name.replace('.nii', '.nii.gz').replace('.mgh', '.mgz'))
        misnamed.write_bytes(plain.read_bytes())
        img = load_image(misnamed)
        assert np.array_equal(np.asanyarray(img.dataobj), data), name
        assert np.allclose(img.affine, affine), name
    plain = tmp_path / 'n1.nii'
    for name, content in (('garbage.nii.gz', b'hello world' * 40),
                          ('short.nii.gz', plain.read_bytes()[:600])):
        bad = tmp_path / name
        bad.write_bytes(content)
        capfd.readouterr()
        with pytest.raises(InputImageError, match='neither gzip-compressed nor a readable') as err:
            load_image(bad)
        assert str(bad) in str(err.value)
        assert capfd.readouterr().err == ''


@pytest.mark.parametrize('change, itk_takes_sform', [
    ('shift', True), ('rotate', True), ('scale', False), ('shear', False)])
def test_qform_and_sform_that_itk_reads_differently_are_warned_about(
        tmp_path, caplog, change, itk_takes_sform):
    """Where the sform is not a rotation times pixdim, ITK (ANTs) reads the qform while we
    (as nibabel, FSL, FreeSurfer) read the sform: when the two differ, a warning names the
    file. A shifted or rotated sform is what ITK reads too: no warning. Checked with ANTs."""
    import logging

    ants = pytest.importorskip('ants')
    qform = np.diag([-2.0, 2.0, 2.0, 1.0])
    qform[:3, 3] = [40, -50, -30]
    sform = qform.copy()
    if change == 'shift':
        sform[:3, 3] += [3, 0, 0]
    elif change == 'rotate':
        c, s = np.cos(0.2), np.sin(0.2)
        sform = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]) @ qform
    elif change == 'scale':
        sform[:3, :3] *= 1.1
    else:
        sform[0, 1] = 0.3
    img = nb.Nifti1Image((RNG.random((30, 32, 28)) * 100).astype(np.float32), qform)
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=1)
    path = tmp_path / f'{change}.nii.gz'
    nb.save(img, str(path))
    theirs = ants.image_read(str(path))
    lps = np.diag([-1.0, -1.0, 1.0])
    read = np.eye(4)
    read[:3, :3] = lps @ np.asarray(theirs.direction) @ np.diag(theirs.spacing)
    read[:3, 3] = lps @ np.asarray(theirs.origin)
    assert np.allclose(read, sform if itk_takes_sform else qform, atol=1e-3)
    with caplog.at_level(logging.WARNING, logger='synthmorph_app'):
        loaded = load_image(path)
    assert np.allclose(loaded.affine, sform)  # we follow the sform
    warned = [r.getMessage() for r in caplog.records if 'qform and an sform' in r.getMessage()]
    assert len(warned) == (0 if itk_takes_sform else 1)
    assert all(str(path) in w and 'mm apart' in w for w in warned)
