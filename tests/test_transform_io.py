"""Transform files: meaning checked against real ANTs and nitransforms, round trips, bad files.

Directions, once for all the checks below:

* our :class:`Transform` maps fixed (reference) RAS points to moving RAS points;
* ANTs/ITK transforms map fixed points to moving points too, in LPS; ``antsApplyTransforms``
  (``ants.apply_transforms(fixed, moving, [file])``) pulls the moving image onto the fixed grid
  through them, exactly what ``apply_transform(moving, moving_geom, xfm, fixed_geom)`` does;
* nitransforms' ``map`` (``Affine``, ``TransformChain`` loaded from ITK ``.h5``) maps reference
  points to moving points in RAS: its output is directly comparable with ``map_points``;
* FreeSurfer LTA matrices map src (moving) to dst (fixed); nitransforms' LTA ``to_ras`` inverts
  them, so its ``Affine.map`` is fixed-to-moving as well.
"""

from __future__ import annotations

import subprocess
import sys
import zlib

import h5py
import nibabel as nb
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from synthmorph_app.engine.spatial import apply_transform, volume_tensor
from synthmorph_app.errors import TransformFileError
from synthmorph_app.io.images import Geometry
from synthmorph_app.io.transforms import (
    TRANSFORM_SUFFIXES,
    Transform,
    apply_affine,
    compose,
    load_transform,
    save_transform,
    transform_description,
)

ants = pytest.importorskip('ants')
nitransforms = pytest.importorskip('nitransforms')

RNG = np.random.default_rng(20260901)
pytestmark = pytest.mark.filterwarnings('ignore:Reference space not set:UserWarning')


# --- test data ----------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope='module')
def _one_torch_thread():
    """The volumes here are tiny: one thread is as fast and does not spin on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rotation(angles_deg) -> np.ndarray:
    a, b, g = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(g), -np.sin(g), 0], [np.sin(g), np.cos(g), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _random_affine(center, rng) -> np.ndarray:
    """Rotation up to 20 deg, scales within 10 %, shift up to 10 mm, about ``center``."""
    lin = _rotation(rng.uniform(-20, 20, 3)) @ np.diag(rng.uniform(0.9, 1.1, 3))
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = center - lin @ center + rng.uniform(-10, 10, 3)
    return out


def _grid(shape, lin, center) -> Geometry:
    """A grid of ``shape`` with voxel-to-RAS linear part ``lin`` centred on ``center``."""
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = center - lin @ ((np.asarray(shape) - 1) / 2)
    return Geometry(tuple(shape), affine)


def _smooth_field(shape, rng, amplitude=4.0) -> np.ndarray:
    """Smoothed noise (a few mm), tapered to zero on the two outer voxel layers.

    ITK interpolates a displacement field up to half a voxel beyond its outer voxel centres by
    repeating the edge value, while we (``map_coordinates``/``grid_sample``) blend towards zero
    there; a field that is zero near its border makes both agree everywhere.
    """
    noise = rng.standard_normal((*shape, 3))
    field = np.stack([gaussian_filter(noise[..., c], 3.0) for c in range(3)], axis=-1)
    field *= amplitude / np.abs(field).max()
    taper = np.zeros(shape)
    taper[2:-2, 2:-2, 2:-2] = 1.0
    return (field * taper[..., None]).astype(np.float32)


def _write_nifti(data, affine, path) -> Geometry:
    img = nb.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nb.save(img, str(path))
    # the geometry ANTs sees: the header's float32 matrix, read back
    return Geometry.from_image(nb.load(str(path)))


def _crop(path, step=3, start=56, size=48):
    """A ``size``^3 crop of a 256^3 conformed FreeSurfer volume, every ``step`` voxels.

    The outer voxel layer is zeroed: ITK's linear interpolator repeats edge voxels for samples
    up to half a voxel outside the image while ``grid_sample`` blends towards zero, so with a
    zero border both agree up to the very edge of the moving image.
    """
    img = nb.load(str(path))
    sl = slice(start, start + size * step, step)
    data = np.asarray(img.dataobj)[sl, sl, sl].astype(np.float32)
    data[[0, -1]] = 0
    data[:, [0, -1]] = 0
    data[:, :, [0, -1]] = 0
    scale = np.diag([step, step, step, 1.0])
    scale[:3, 3] = start
    return data, img.affine @ scale


@pytest.fixture(scope='module')
def cases(shared_data, tmp_path_factory):
    """Two moving/fixed pairs of real data: LIA -> RAS, and oblique LPS -> oblique LAS-like."""
    out = tmp_path_factory.mktemp('xfm_cases')
    mri = shared_data / 'freesurfer' / 'bert' / 'mri'
    norm, affine = _crop(mri / 'norm.mgz')
    aseg, _ = _crop(mri / 'aseg.mgz')
    center = affine[:3, :3] @ ((np.asarray(norm.shape) - 1) / 2) + affine[:3, 3]
    result = {}

    # 1) moving as FreeSurfer stores it (LIA, 3 mm), fixed RAS 3.2 mm
    moving = _write_nifti(norm, affine, out / 'lia_moving.nii.gz')
    _write_nifti(aseg, affine, out / 'lia_labels.nii.gz')
    fixed = _grid((44, 40, 46), np.diag([3.2, 3.2, 3.2]), center)
    fixed = _write_nifti(np.zeros(fixed.shape), fixed.affine, out / 'lia_fixed.nii.gz')
    result['lia_to_ras'] = (norm, aseg, moving, fixed)

    # 2) the same anatomy stored LPS with an oblique header (rotated 12-15 deg in the world),
    #    fixed grid oblique, LAS-like, anisotropic
    ornt = nb.orientations.ornt_transform(
        nb.orientations.io_orientation(affine), nb.orientations.axcodes2ornt('LPS')
    )
    norm_lps = nb.orientations.apply_orientation(norm, ornt)
    aseg_lps = nb.orientations.apply_orientation(aseg, ornt)
    lps = affine @ nb.orientations.inv_ornt_aff(ornt, norm.shape)
    tilt = np.eye(4)
    tilt[:3, :3] = _rotation((12, -8, 15))
    tilt[:3, 3] = center - tilt[:3, :3] @ center
    oblique = tilt @ lps
    assert ''.join(nb.aff2axcodes(lps)) == 'LPS'
    moving = _write_nifti(norm_lps, oblique, out / 'obl_moving.nii.gz')
    _write_nifti(aseg_lps, oblique, out / 'obl_labels.nii.gz')
    lin = _rotation((-10, 6, 18)) @ np.diag([-3.2, 3.0, 3.4])
    fixed = _grid((42, 46, 40), lin, tilt[:3, :3] @ center + tilt[:3, 3])
    fixed = _write_nifti(np.zeros(fixed.shape), fixed.affine, out / 'obl_fixed.nii.gz')
    result['lps_oblique_to_oblique'] = (norm_lps, aseg_lps, moving, fixed)
    return out, result


def _transform(kind, moving, fixed, rng) -> Transform:
    """A random transform: ``affine``, ``field`` (on the fixed grid) or ``field_oblique``
    (on a coarser oblique grid of other orientation that covers the fixed grid)."""
    center = fixed.affine[:3, :3] @ ((np.asarray(fixed.shape) - 1) / 2) + fixed.affine[:3, 3]
    affine = _random_affine(center, rng)
    if kind == 'affine':
        return Transform(affine, reference=fixed, moving=moving)
    if kind == 'field':
        grid = fixed
    else:
        grid = _grid((60, 56, 62), _rotation((8, -12, 20)) @ np.diag([2.6, -2.8, 2.7]), center)
    field = _smooth_field(grid.shape, rng)
    return Transform(affine, field, grid, reference=fixed, moving=moving)


# --- ANTs resamples with our files as we do ------------------------------------------------


ANTS_CASES = [
    ('.txt', 'affine'),
    ('.mat', 'affine'),
    ('.h5', 'affine'),
    ('.nii.gz', 'affine'),
    ('.h5', 'field'),
    ('.h5', 'field_oblique'),
    ('.nii.gz', 'field'),
]


@pytest.mark.parametrize('pair', ['lia_to_ras', 'lps_oblique_to_oblique'])
@pytest.mark.parametrize(('suffix', 'kind'), ANTS_CASES)
def test_ants_resamples_like_us(cases, pair, suffix, kind, tmp_path):
    folder, data = cases
    norm, aseg, moving, fixed = data[pair]
    rng = np.random.default_rng(zlib.crc32(f'{pair}{suffix}{kind}'.encode()))
    xfm = _transform(kind, moving, fixed, rng)
    path = save_transform(xfm, tmp_path / f'xfm{suffix}')

    prefix = 'lia' if pair == 'lia_to_ras' else 'obl'
    ants_fixed = ants.image_read(str(folder / f'{prefix}_fixed.nii.gz'))
    ants_moving = ants.image_read(str(folder / f'{prefix}_moving.nii.gz'))
    ants_labels = ants.image_read(str(folder / f'{prefix}_labels.nii.gz'))

    theirs = ants.apply_transforms(ants_fixed, ants_moving, [str(path)]).numpy()
    ours = apply_transform(volume_tensor(norm), moving, xfm, fixed, 'linear')[0, 0].numpy()
    span = float(norm.max() - norm.min())
    assert ours.std() > 0.1 * span  # the moved image is not empty
    assert np.abs(theirs - ours).max() < 1e-3 * span

    theirs = ants.apply_transforms(
        ants_fixed, ants_labels, [str(path)], interpolator='nearestNeighbor'
    ).numpy()
    ours = apply_transform(volume_tensor(aseg), moving, xfm, fixed, 'nearest')[0, 0].numpy()
    assert len(np.unique(ours)) > 20
    assert (theirs == ours).mean() >= 0.999

    if kind == 'field_oblique':
        # ANTs' genericLabel (per-label linear interpolation, most likely label wins) is what
        # our 'labels' mode does
        theirs = ants.apply_transforms(
            ants_fixed, ants_labels, [str(path)], interpolator='genericLabel'
        ).numpy()
        ours = apply_transform(volume_tensor(aseg), moving, xfm, fixed, 'labels')[0, 0].numpy()
        assert (theirs == ours).mean() >= 0.999


@pytest.mark.parametrize(('first_kind', 'second_kind'), [
    ('field_oblique', 'affine'), ('affine', 'field_oblique'), ('field_oblique', 'field_oblique')])
def test_a_chain_resamples_like_ants(cases, first_kind, second_kind, tmp_path):
    """``compose(first, second)`` (``apply --before``) moves an image as antsApplyTransforms
    does with the list ``[first, second]``: points through ``first``, then ``second``. With a
    linear member the composition is exact; two fields become one on the output grid, exact
    at its voxels."""
    folder, data = cases
    norm, _, moving, fixed = data['lps_oblique_to_oblique']
    rng = np.random.default_rng(zlib.crc32(f'{first_kind}{second_kind}'.encode()))
    center = fixed.affine[:3, :3] @ ((np.asarray(fixed.shape) - 1) / 2) + fixed.affine[:3, 3]
    # an intermediate space of its own (as a T1w between a BOLD and MNI), with small moves so
    # that the anatomy stays in view through both
    middle = _grid((40, 44, 42), _rotation((0, 10, -6)) @ np.diag([3.1, 3.0, 3.3]), center)
    first = _transform(first_kind, middle, fixed, rng)
    second = _transform(second_kind, moving, middle, rng)
    chained = compose(first, second)
    assert chained.is_linear == (first.is_linear and second.is_linear)
    pts = _grid_points(fixed)[::11]
    err = np.abs(chained.map_points(pts) - second.map_points(first.map_points(pts))).max()
    assert err < 1e-4, err
    paths = [save_transform(xfm, tmp_path / f'{name}.h5')
             for name, xfm in (('first', first), ('second', second))]
    ants_fixed = ants.image_read(str(folder / 'obl_fixed.nii.gz'))
    ants_moving = ants.image_read(str(folder / 'obl_moving.nii.gz'))
    theirs = ants.apply_transforms(ants_fixed, ants_moving, [str(p) for p in paths]).numpy()
    ours = apply_transform(volume_tensor(norm), moving, chained, fixed, 'linear')[0, 0].numpy()
    span = float(norm.max() - norm.min())
    assert ours.std() > 0.1 * span
    assert np.abs(theirs - ours).max() < 1e-3 * span
    # the other order is another transform: the test can tell them apart
    reversed_order = ants.apply_transforms(ants_fixed, ants_moving,
                                           [str(p) for p in paths[::-1]]).numpy()
    assert np.abs(reversed_order - ours).mean() > 10 * np.abs(theirs - ours).mean()


def test_a_chain_with_inverted_matrices_resamples_like_ants(cases, tmp_path):
    """``compose_files`` with ``(file, True)`` entries (``apply --before-inverse``, ``-I``)
    inverts those matrices in place, as antsApplyTransforms' ``[file,1]``; a field is not
    inverted: one clear error."""
    from synthmorph_app.io.transforms import compose_files, inverted

    folder, data = cases
    norm, _, moving, fixed = data['lps_oblique_to_oblique']
    rng = np.random.default_rng(11)
    center = fixed.affine[:3, :3] @ ((np.asarray(fixed.shape) - 1) / 2) + fixed.affine[:3, 3]
    middle = _grid((40, 44, 42), _rotation((0, 10, -6)) @ np.diag([3.1, 3.0, 3.3]), center)
    # first (fixed -> middle) is stored the other way round: middle -> fixed points
    first_inverse = _transform('affine', fixed, middle, rng)
    second = _transform('field_oblique', moving, middle, rng)
    paths = {name: save_transform(xfm, tmp_path / name)
             for name, xfm in (('first_inv.mat', first_inverse), ('second.h5', second))}
    first = inverted(load_transform(paths['first_inv.mat']), paths['first_inv.mat'])
    first.reference = fixed
    chained = compose_files(first, [(str(paths['second.h5']), False)], grid=fixed)
    ants_fixed = ants.image_read(str(folder / 'obl_fixed.nii.gz'))
    ants_moving = ants.image_read(str(folder / 'obl_moving.nii.gz'))
    theirs = ants.apply_transforms(ants_fixed, ants_moving,
                                   [str(paths['first_inv.mat']), str(paths['second.h5'])],
                                   whichtoinvert=[True, False]).numpy()
    ours = apply_transform(volume_tensor(norm), moving, chained, fixed, 'linear')[0, 0].numpy()
    span = float(norm.max() - norm.min())
    assert ours.std() > 0.1 * span
    assert np.abs(theirs - ours).max() < 1e-3 * span
    # an inverted entry inside the chain: second stored the other way (moving -> middle)
    second_inverse = _transform('affine', middle, moving, rng)
    path = save_transform(second_inverse, tmp_path / 'second_inv.mat')
    first_field = _transform('field_oblique', middle, fixed, rng)
    chained = compose_files(first_field, [(path, True)], grid=fixed)
    theirs = ants.apply_transforms(
        ants_fixed, ants_moving,
        [str(save_transform(first_field, tmp_path / 'first.h5')), str(path)],
        whichtoinvert=[False, True]).numpy()
    ours = apply_transform(volume_tensor(norm), moving, chained, fixed, 'linear')[0, 0].numpy()
    assert ours.std() > 0.1 * span
    assert np.abs(theirs - ours).max() < 1e-3 * span
    with pytest.raises(TransformFileError, match='only linear transforms are inverted') as err:
        compose_files(first, [(str(paths['second.h5']), True)], grid=fixed)
    assert 'second.h5' in str(err.value)


def _write_itk_members(path, members):
    """An ITK composite ``.h5`` of ``(type, parameters, fixed parameters)`` members."""
    text = h5py.string_dtype('ascii')
    with h5py.File(path, 'w') as h5:
        root = h5.create_group('TransformGroup')
        members = [('CompositeTransform_double_3_3', None, None), *members]
        for i, (ttype, params, fixed) in enumerate(members):
            group = root.create_group(str(i))
            group.create_dataset('TransformType', data=np.array([ttype], dtype=object), dtype=text)
            if params is not None:
                group.create_dataset('TransformParameters', data=params)
                group.create_dataset('TransformFixedParameters', data=fixed)


def _itk_affine_member(affine_ras, center_lps):
    """An ``AffineTransform_double_3_3`` member with a non-zero centre, as ANTs writes them."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ affine_ras @ flip
    mat, offset = lps[:3, :3], lps[:3, 3]
    translation = offset - center_lps + mat @ center_lps
    params = np.concatenate([mat.ravel(), translation])
    return ('AffineTransform_double_3_3', params, np.asarray(center_lps, dtype=float))


def test_ants_composite_of_several_members(cases, tmp_path):
    """A composite [affine1, field, affine2] (ITK applies affine2 first) loads into one
    Transform that resamples like ANTs, and maps points like nitransforms' chain."""
    folder, data = cases
    norm, _, moving, fixed = data['lps_oblique_to_oblique']
    rng = np.random.default_rng(7)
    field_xfm = _transform('field_oblique', moving, fixed, rng)
    center = fixed.affine[:3, :3] @ ((np.asarray(fixed.shape) - 1) / 2) + fixed.affine[:3, 3]
    second = _random_affine(center, rng)
    second[:3, :3] = _rotation(rng.uniform(-5, 5, 3))  # small: stay on the field's grid
    second[:3, 3] = center - second[:3, :3] @ center + rng.uniform(-3, 3, 3)
    written = save_transform(field_xfm, tmp_path / 'field.h5')
    with h5py.File(written) as h5:
        grp = h5['TransformGroup/2']
        field_member = (
            'DisplacementFieldTransform_float_3_3',
            np.asarray(grp['TransformParameters']),
            np.asarray(grp['TransformFixedParameters']),
        )
    path = tmp_path / 'composite.h5'
    _write_itk_members(
        path,
        [
            _itk_affine_member(field_xfm.affine, rng.uniform(-20, 20, 3)),
            field_member,
            _itk_affine_member(second, rng.uniform(-20, 20, 3)),
        ],
    )
    xfm = load_transform(path, reference=fixed, moving=moving)
    assert xfm.field is not None

    # meaning: y = affine1(p + field(p)), p = second(x)
    pts = apply_affine(np.linalg.inv(second), _grid_points(field_xfm.field_geometry)[::7])
    p = apply_affine(second, pts)
    assert np.abs(xfm.map_points(pts) - field_xfm.map_points(p)).max() < 1e-4
    chain = nitransforms.manip.load(str(path), fmt='itk')
    assert np.abs(chain.map(pts) - xfm.map_points(pts)).max() < 1e-4

    ants_fixed = ants.image_read(str(folder / 'obl_fixed.nii.gz'))
    ants_moving = ants.image_read(str(folder / 'obl_moving.nii.gz'))
    theirs = ants.apply_transforms(ants_fixed, ants_moving, [str(path)]).numpy()
    ours = apply_transform(volume_tensor(norm), moving, xfm, fixed, 'linear')[0, 0].numpy()
    assert np.abs(theirs - ours).max() < 1e-3 * float(norm.max() - norm.min())


def _field_member(xfm: Transform, tmp_path, name) -> tuple:
    """The ``DisplacementFieldTransform`` member our writer stores for ``xfm``'s field."""
    written = save_transform(xfm, tmp_path / f'{name}.h5')
    with h5py.File(written) as h5:
        grp = h5['TransformGroup/2']
        return ('DisplacementFieldTransform_float_3_3', np.asarray(grp['TransformParameters']),
                np.asarray(grp['TransformFixedParameters']))


def test_a_composite_of_two_fields_resamples_like_ants(cases, tmp_path):
    """An ITK composite [affine, field2, field1] (two registrations, ITK applies field1
    first) loads into one Transform, the fields met on the fixed grid of field1, and moves the
    image as ANTs does with the file."""
    folder, data = cases
    norm, _, moving, fixed = data['lps_oblique_to_oblique']
    rng = np.random.default_rng(5)
    first = _transform('field', moving, fixed, rng)  # its field lies on the fixed grid
    second = _transform('field_oblique', moving, fixed, rng)
    path = tmp_path / 'two.h5'
    _write_itk_members(path, [
        _itk_affine_member(second.affine, rng.uniform(-20, 20, 3)),
        _field_member(Transform(np.eye(4), second.field, second.field_geometry), tmp_path, 'f2'),
        _field_member(Transform(np.eye(4), first.field, first.field_geometry), tmp_path, 'f1'),
    ])
    xfm = load_transform(path, reference=fixed, moving=moving)
    assert xfm.field_geometry == fixed and np.allclose(xfm.affine, second.affine)
    # meaning: y = A2 (p + f2(p)), p = x + f1(x)
    pts = _grid_points(fixed)[::13]
    p = pts + first.displacement_at(pts)
    expected = apply_affine(second.affine, p + second.displacement_at(p))
    assert np.abs(xfm.map_points(pts) - expected).max() < 1e-3
    ants_fixed = ants.image_read(str(folder / 'obl_fixed.nii.gz'))
    ants_moving = ants.image_read(str(folder / 'obl_moving.nii.gz'))
    theirs = ants.apply_transforms(ants_fixed, ants_moving, [str(path)]).numpy()
    ours = apply_transform(volume_tensor(norm), moving, xfm, fixed, 'linear')[0, 0].numpy()
    span = float(norm.max() - norm.min())
    assert ours.std() > 0.1 * span
    assert np.abs(theirs - ours).max() < 1e-3 * span


# --- nitransforms reads our files the same way -------------------------------------------


def _grid_points(geometry: Geometry) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in geometry.shape], indexing='ij'), -1)
    return apply_affine(geometry.affine, ijk.reshape(-1, 3))


@pytest.mark.parametrize('kind', ['affine', 'field_oblique'])
def test_nitransforms_reads_our_h5(kind, tmp_path):
    moving = Geometry((30, 32, 28), np.diag([-2.0, 2.0, 2.0, 1.0]))
    fixed = _grid((24, 26, 22), _rotation((5, 10, -20)) @ np.diag([2.5, 2.5, 2.5]), np.zeros(3))
    xfm = _transform(kind, moving, fixed, np.random.default_rng(3))
    path = save_transform(xfm, tmp_path / 'xfm.h5')
    # ITKCompositeH5 + TransformChain: [affine, field] in the file becomes the chain
    # [field, affine], applied in that order: T(x) = affine(x + field(x)), as ours.
    chain = nitransforms.manip.load(str(path), fmt='itk')
    if xfm.field is None:
        points = RNG.uniform(-40, 40, (500, 3))
    else:
        # DenseFieldTransform.map samples exactly at the field's voxel centres (it interpolates
        # with cubic B-splines elsewhere, a different interpolant from our trilinear one)
        points = _grid_points(xfm.field_geometry)
    assert np.abs(chain.map(points) - xfm.map_points(points)).max() < 1e-4


def test_nitransforms_reads_our_lta(tmp_path):
    moving = Geometry(
        (30, 32, 28), np.array([[-2.0, 0, 0, 30], [0, 0, 2, -20], [0, -2, 0, 25], [0, 0, 0, 1]])
    )
    fixed = _grid((24, 26, 22), _rotation((5, 10, -20)) @ np.diag([2.5, 2.4, 2.6]), np.ones(3))
    xfm = _transform('affine', moving, fixed, np.random.default_rng(4))
    path = save_transform(xfm, tmp_path / 'xfm.lta')
    # nitransforms' LTA to_ras() inverts the LTA matrix (moving->fixed): Affine.map is
    # fixed -> moving like ours
    loaded = nitransforms.linear.load(str(path), fmt='lta')
    points = RNG.uniform(-40, 40, (500, 3))
    assert np.abs(loaded.map(points) - xfm.map_points(points)).max() < 1e-4
    # FreeSurfer's convention: src = moving, dst = fixed, matrix maps src -> dst
    lta = nitransforms.io.lta.FSLinearTransformArray.from_filename(str(path))
    inner = lta['xforms'][0]
    assert int(inner.structarr['type']) == 1
    assert np.allclose(inner['src'].as_affine(), moving.affine, atol=1e-4)
    assert np.allclose(inner['dst'].as_affine(), fixed.affine, atol=1e-4)
    assert tuple(inner['src'].structarr['volume']) == moving.shape
    m_l = inner.structarr['m_L']
    assert np.allclose(apply_affine(m_l, xfm.map_points(points)), points, atol=1e-4)


# --- round trips ---------------------------------------------------------------------------


ROUND_TRIPS = [
    ('.lta', 'affine', 'itk'),
    ('.txt', 'affine', 'itk'),
    ('.mat', 'affine', 'itk'),
    ('.h5', 'affine', 'itk'),
    ('.h5', 'field', 'itk'),
    ('.h5', 'field_oblique', 'itk'),
    ('.nii.gz', 'affine', 'itk'),
    ('.nii.gz', 'field', 'itk'),
    ('.nii', 'field_oblique', 'itk'),
    ('.mgz', 'field', 'itk'),
    ('.nii.gz', 'affine', 'synthmorph'),
    ('.nii.gz', 'field', 'synthmorph'),
    ('.nii', 'field_oblique', 'synthmorph'),
    ('.mgz', 'field', 'synthmorph'),
]


@pytest.mark.parametrize(('suffix', 'kind', 'convention'), ROUND_TRIPS)
def test_round_trip(suffix, kind, convention, tmp_path):
    moving = Geometry(
        (30, 32, 28),
        np.array([[0, 0, 2.0, -30], [-2.0, 0, 0, 20], [0, -2.0, 0, 25], [0, 0, 0, 1]]),
    )
    fixed = _grid((24, 26, 22), _rotation((5, 10, -20)) @ np.diag([2.5, 2.5, 2.5]), np.ones(3))
    xfm = _transform(kind, moving, fixed, np.random.default_rng(5))
    path = save_transform(xfm, tmp_path / f'xfm{suffix}', field_convention=convention)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left
    back = load_transform(path, field_convention=convention, reference=fixed, moving=moving)
    # folded fields hold T on the fixed grid only (identity outside): compare inside it
    grid = fixed if suffix in ('.nii.gz', '.nii', '.mgz') else (xfm.field_geometry or fixed)
    lo, hi = np.zeros(3), np.asarray(grid.shape) - 1.0
    ijk = RNG.uniform(lo, hi, (2000, 3))
    if suffix in ('.nii.gz', '.nii', '.mgz') and kind == 'field_oblique':
        # resampled onto the fixed grid: exact at its inner voxel centres only
        ijk = np.clip(np.round(ijk), 1, hi - 1)
    points = apply_affine(grid.affine, ijk)
    assert np.abs(back.map_points(points) - xfm.map_points(points)).max() < 1e-4
    assert back.reference == fixed and back.moving == moving
    if suffix == '.lta':  # the grids come from the file itself
        back = load_transform(path)
        assert back.reference == fixed and back.moving == moving
    if suffix in ('.nii.gz', '.nii', '.mgz'):
        img = nb.load(str(path))
        assert np.allclose(img.affine, grid.affine, atol=1e-4)
        if convention == 'itk' and suffix != '.mgz':
            assert img.shape == (*grid.shape, 1, 3)
            assert img.header.get_intent()[0] == 'vector'
        else:
            assert img.shape == (*grid.shape, 3)
        # x + d(x) at a voxel centre is where T sends it (RAS or LPS vectors)
        disp = np.asarray(img.dataobj, dtype=float).reshape(*grid.shape, 3)
        if convention == 'itk':
            disp[..., :2] *= -1
        idx = (3, 4, 5)
        x = apply_affine(grid.affine, np.array([idx]))
        assert np.allclose(x + disp[idx], xfm.map_points(x), atol=1e-4)


def test_conventions_differ(tmp_path):
    """An ITK field read as mri_synthmorph's (or the reverse) maps points elsewhere."""
    fixed = _grid((16, 18, 14), np.diag([2.0, 2.0, 2.0]), np.zeros(3))
    xfm = _transform('field', fixed, fixed, np.random.default_rng(6))
    path = save_transform(xfm, tmp_path / 'f.nii.gz', field_convention='synthmorph')
    wrong = load_transform(path, field_convention='itk')
    points = _grid_points(fixed)
    assert np.abs(wrong.map_points(points) - xfm.map_points(points)).max() > 1.0


def _fsl_coords(geometry: Geometry) -> np.ndarray:
    """FSL's scaled voxel coordinates of a grid, by FLIRT's definition: voxel index times voxel
    size, the first axis mirrored where the voxel-to-world matrix has a positive determinant
    (FSL works in radiological order)."""
    zooms = np.sqrt((geometry.affine[:3, :3] ** 2).sum(0))
    out = np.diag([*zooms, 1.0])
    if np.linalg.det(geometry.affine) > 0:
        out = np.diag([-1.0, 1.0, 1.0, 1.0]) @ out
        out[0, 3] = (geometry.shape[0] - 1) * zooms[0]
    return out  # voxel index -> FSL coordinates


def test_fsl_flirt_matrices_mean_what_flirt_says(tmp_path):
    """A FLIRT matrix maps the input (moving) image's FSL coordinates to the reference's; read
    with both grids it maps reference points to moving points as that definition says, for
    grids of either handedness; without them it is one clear error."""
    path = tmp_path / 'flirt.mat'
    # by hand: +4 mm along FSL's x between two RAS-stored 2 mm grids (mirrored in FSL): the
    # reference point lands 4 mm further right in the moving image
    grid = Geometry((40, 48, 44), np.diag([2.0, 2.0, 2.0, 1.0]))
    path.write_text('1 0 0 4\n0 1 0 0\n0 0 1 0\n0 0 0 1\n')
    xfm = load_transform(path, reference=grid, moving=grid)
    pts = RNG.uniform(-20, 60, (10, 3))
    assert np.allclose(xfm.map_points(pts), pts + [4, 0, 0])
    # random matrices between grids of both handednesses and other voxel sizes
    moving = _grid((30, 36, 32), _rotation((4, -6, 8)) @ np.diag([-2.4, 2.2, 2.6]), np.zeros(3))
    reference = _grid((44, 40, 46), np.diag([1.9, 2.1, 2.0]), np.ones(3) * 5)
    for ref, mov in ((reference, moving), (moving, reference), (reference, reference)):
        flirt = _random_affine(np.zeros(3), RNG)  # FSL coords of the input -> of the reference
        path.write_text('\n'.join(' '.join(f'{v:.10f}' for v in row) for row in flirt) + '\n')
        xfm = load_transform(path, reference=ref, moving=mov)
        assert xfm.reference == ref and xfm.moving == mov
        # reference RAS -> its voxels -> its FSL coords -> the input's FSL coords -> RAS
        expected = (mov.affine @ np.linalg.inv(_fsl_coords(mov)) @ np.linalg.inv(flirt)
                    @ _fsl_coords(ref) @ np.linalg.inv(ref.affine))
        assert np.allclose(xfm.affine, expected, atol=1e-6)
    for kwargs in ({}, {'reference': reference}, {'moving': moving}):
        with pytest.raises(TransformFileError, match='FSL FLIRT matrix') as err:
            load_transform(path, **kwargs)
        assert str(path) in str(err.value)
    # an ITK .mat is still an ITK .mat
    itk = save_transform(Transform(_random_affine(np.zeros(3), RNG)), tmp_path / 'itk.mat')
    assert load_transform(itk).reference is None


def test_itk_text_from_ants_is_read(tmp_path):
    """An affine written by ANTs itself (non-zero centre) loads to what ANTs applies."""
    matrix = _rotation((10, -5, 7)) * 1.05
    tx = ants.create_ants_transform(
        transform_type='AffineTransform',
        dimension=3,
        matrix=matrix,
        translation=(3.0, -2.0, 5.0),
        center=(10.0, -20.0, 15.0),
    )
    points_lps = RNG.uniform(-50, 50, (20, 3))
    for suffix in ('.txt', '.mat'):
        path = tmp_path / f'ants{suffix}'
        ants.write_transform(tx, str(path))
        xfm = load_transform(path)
        mapped = np.array([tx.apply_to_point(tuple(p)) for p in points_lps])
        ras = points_lps * [-1, -1, 1]
        assert np.abs(xfm.map_points(ras) - mapped * [-1, -1, 1]).max() < 1e-4


@pytest.mark.parametrize('ttype', ['Euler3DTransform', 'CenteredEuler3DTransform',
                                   'Similarity3DTransform', 'QuaternionRigidTransform'])
def test_itk_rotations_written_by_ants_are_read(ttype, tmp_path):
    """The rigid and similarity parameterisations other tools write (SimpleITK's Euler3D,
    BRAINSFit's versors...), written here by ANTs itself with a centre off the origin, load
    to what ANTs applies, from text and MATLAB files."""
    rng = np.random.default_rng(zlib.crc32(ttype.encode()))
    shift = rng.uniform(-20, 20, 3)
    params = {
        'Euler3DTransform': np.r_[rng.uniform(-0.5, 0.5, 3), shift],
        'CenteredEuler3DTransform': np.r_[rng.uniform(-0.5, 0.5, 3), rng.uniform(-30, 30, 3),
                                          shift],
        'Similarity3DTransform': np.r_[rng.uniform(-0.3, 0.3, 3), shift, 1.1],
        'QuaternionRigidTransform': np.r_[rng.normal(size=4), shift],
    }[ttype]
    if ttype == 'QuaternionRigidTransform':
        params[:4] /= np.linalg.norm(params[:4])
    tx = ants.create_ants_transform(transform_type=ttype, dimension=3, precision='double')
    tx.set_parameters(params)
    fixed = np.asarray(tx.fixed_parameters, dtype=float).copy()
    fixed[:3] = rng.uniform(-40, 40, 3)
    tx.set_fixed_parameters(fixed)
    points_lps = rng.uniform(-80, 80, (20, 3))
    mapped = np.array([tx.apply_to_point(tuple(p)) for p in points_lps])
    assert np.abs(mapped - points_lps).max() > 5  # a transform worth the name
    for suffix in ('.txt', '.mat'):
        path = tmp_path / f'rotation{suffix}'
        ants.write_transform(tx, str(path))
        xfm = load_transform(path)
        ras = points_lps * [-1, -1, 1]
        assert np.abs(xfm.map_points(ras) - mapped * [-1, -1, 1]).max() < 1e-4, suffix
    if ttype == 'Similarity3DTransform':
        # ANTs cannot write a VersorRigid3D: it is the similarity's versor and shift at scale 1
        tx.set_parameters(np.r_[params[:6], 1.0])
        mapped = np.array([tx.apply_to_point(tuple(p)) for p in points_lps])
        path = tmp_path / 'versor.txt'
        path.write_text('#Insight Transform File V1.0\n#Transform 0\n'
                        'Transform: VersorRigid3DTransform_double_3_3\n'
                        f'Parameters: {" ".join(repr(float(v)) for v in params[:6])}\n'
                        f'FixedParameters: {" ".join(repr(float(v)) for v in fixed[:3])}\n')
        xfm = load_transform(path)
        assert np.abs(xfm.map_points(points_lps * [-1, -1, 1])
                      - mapped * [-1, -1, 1]).max() < 1e-4


def test_reads_composites_written_by_ants(tmp_path):
    """A composite ANTs writes itself, [field, affine] (ITK applies the affine first, then the
    oblique field), loads to the point mapping ANTs applies."""
    rng = np.random.default_rng(8)
    tx = ants.create_ants_transform(
        transform_type='AffineTransform',
        dimension=3,
        matrix=_rotation((4, -6, 9)) * 1.05,
        translation=(3.0, -2.0, 5.0),
        center=(10.0, -20.0, 15.0),
    )
    shape = (10, 11, 12)
    direction = _rotation((0, 0, 90)) @ _rotation((10, 0, 0))  # LPS, not axis-aligned
    values = gaussian_filter(rng.standard_normal((*shape, 3)), (1.5, 1.5, 1.5, 0)) * 5
    field = ants.from_numpy(
        values.astype(np.float32),
        origin=(1.0, 2.0, 3.0),
        spacing=(2.0, 2.5, 3.0),
        direction=direction,
        has_components=True,
    )
    composite = ants.compose_ants_transforms([tx, ants.transform_from_displacement_field(field)])
    path = tmp_path / 'ants_composite.h5'
    ants.write_transform(composite, str(path))
    with h5py.File(path) as h5:  # ITK applies TransformGroup/2 (the affine) first
        assert h5['TransformGroup/1/TransformType'][0].startswith(b'DisplacementField')
        assert h5['TransformGroup/2/TransformType'][0].startswith(b'AffineTransform')
    xfm = load_transform(path)
    # points whose affine image falls inside the field's grid, off its voxel centres
    index = rng.uniform(1, np.asarray(shape) - 2, (200, 3))
    inside_lps = (direction * [2.0, 2.5, 3.0]) @ index.T + np.array([[1.0], [2.0], [3.0]])
    points_lps = np.array([tx.invert().apply_to_point(tuple(p)) for p in inside_lps.T])
    theirs = np.array([composite.apply_to_point(tuple(p)) for p in points_lps])
    ours = xfm.map_points(points_lps * [-1, -1, 1]) * [-1, -1, 1]
    assert np.abs(theirs - ours).max() < 1e-4
    affine_only = np.array([tx.apply_to_point(tuple(p)) for p in points_lps])
    assert np.abs(theirs - affine_only).max() > 0.5  # the field matters


# --- errors ----------------------------------------------------------------------------------


def _linear():
    geom = Geometry((8, 8, 8), np.eye(4))
    return Transform(np.eye(4), reference=geom, moving=geom)


@pytest.mark.parametrize(
    ('name', 'content'),
    [
        ('missing.lta', None),
        ('garbage.lta', b'type = 1\nnot an lta\n'),
        ('empty.txt', b''),
        (
            'garbage.txt',
            (b'#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\n'
            b'Parameters: 1 2 3\nFixedParameters: 0 0 0\n'),
        ),
        (
            'bspline.txt',
            (b'#Insight Transform File V1.0\nTransform: BSplineTransform_double_3_3\n'
            b'Parameters: 0 0 0 1 2 3\nFixedParameters: 0 0 0\n'),
        ),
        ('garbage.mat', b'\x00\x01\x02 not matlab'),
        ('garbage.h5', b'not hdf5 at all'),
        ('garbage.nii.gz', b'not gzip'),
        ('truncated.nii.gz', 'truncate'),
        ('scalar.nii.gz', 'scalar'),
        ('unknown.xfm', b'1 0 0 0'),
    ],
)
def test_bad_files_raise_naming_the_path(name, content, tmp_path):
    path = tmp_path / name
    if content == 'truncate':
        geom = Geometry((8, 8, 8), np.eye(4))
        field = RNG.standard_normal((8, 8, 8, 3)).astype(np.float32)
        save_transform(Transform(np.eye(4), field, geom), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == 'scalar':
        nb.save(nb.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(path))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(TransformFileError) as err:
        load_transform(path)
    assert f'<{path}>' in str(err.value)
    if name.endswith('.xfm'):
        assert '.lta' in str(err.value) and '.h5' in str(err.value)


def test_write_errors(tmp_path):
    geom = Geometry((8, 8, 8), np.eye(4))
    with_field = Transform(np.eye(4), np.zeros((8, 8, 8, 3), np.float32), geom, geom, geom)
    for suffix in ('.lta', '.txt', '.mat'):
        with pytest.raises(TransformFileError, match='linear transforms only') as err:
            save_transform(with_field, tmp_path / f'x{suffix}')
        assert f'<{tmp_path / f"x{suffix}"}>' in str(err.value)
    with pytest.raises(TransformFileError, match='moving'):
        save_transform(Transform(np.eye(4), reference=geom), tmp_path / 'x.lta')
    with pytest.raises(TransformFileError, match='reference'):
        save_transform(Transform(np.eye(4)), tmp_path / 'x.nii.gz')
    with pytest.raises(TransformFileError, match='unknown extension'):
        save_transform(_linear(), tmp_path / 'x.xfm')
    with pytest.raises(ValueError, match='field_convention'):
        save_transform(_linear(), tmp_path / 'x.nii.gz', field_convention='fsl')
    assert list(tmp_path.iterdir()) == []


def test_descriptions_say_the_direction():
    for suffix in TRANSFORM_SUFFIXES:
        text = transform_description(f'out{suffix}')
        assert text.startswith(suffix) and 'fixed' in text and 'moving' in text
    assert 'src' in transform_description('a.lta')
    assert 'LPS' in transform_description('a.nii.gz')
    assert 'RAS' in transform_description('a.nii.gz', field_convention='synthmorph')
    with pytest.raises(TransformFileError, match='<a.xfm>'):
        transform_description('a.xfm')


def test_io_does_not_import_torch():
    code = 'import sys, synthmorph_app.io.transforms; assert "torch" not in sys.modules'
    subprocess.run([sys.executable, '-c', code], check=True)
