"""The evaluation metrics (synthmorph_app.evaluate) and ``synthmorph-app evaluate``."""

from __future__ import annotations

import json

import nibabel as nb
import numpy as np
import pytest

from synthmorph_app import evaluate as ev
from synthmorph_app.cli.run import main
from synthmorph_app.io.images import Geometry
from synthmorph_app.io.transforms import Transform, save_transform


def test_dice_by_hand():
    a = np.zeros((4, 4, 4), int)
    b = np.zeros_like(a)
    a[:2], a[2:] = 1, 2
    b[:3], b[3:] = 1, 2
    b[0, 0, 0] = 7  # in one map only: not scored by default, 0 when asked for
    scores = ev.dice_per_label(a, b)
    assert set(scores) == {1, 2}
    assert scores[1] == pytest.approx(2 * 31 / (32 + 47))
    assert scores[2] == pytest.approx(2 * 16 / (32 + 16))
    assert ev.dice_per_label(a, b, [7, 9]) == {7: 0.0}
    assert ev.mean_dice(scores) == pytest.approx(np.mean(list(scores.values())))
    assert ev.largest_labels(b, 1) == [1]
    assert ev.largest_labels(b, 5, among=[2, 7]) == [2, 7]
    with pytest.raises(ValueError, match='differ in shape'):
        ev.dice_per_label(a, b[:2])


def _smooth(shape, seed):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.random(shape), 2).astype(np.float32)


def test_mind_ncc_is_contrast_blind_and_slabs_agree(monkeypatch):
    img = _smooth((40, 36, 44), 0)
    assert ev.mind_ncc(img, img) == pytest.approx(1.0, abs=1e-6)
    inverted = 5.0 - 3.0 * img  # another contrast of the same anatomy
    assert ev.mind_ncc(inverted, img) == pytest.approx(1.0, abs=1e-4)
    shifted = np.roll(img, 3, axis=0)
    full = ev.mind_ncc(shifted, img)
    assert full < 0.9 < ev.mind_ncc(inverted, img)
    mask = np.zeros(img.shape, bool)
    mask[5:30, 6:30, 4:40] = True
    masked = ev.mind_ncc(shifted, img, mask)
    monkeypatch.setattr(ev, '_MIND_SLAB_VOXELS', 40 * 36 * 3)  # many slabs
    assert ev.mind_ncc(shifted, img) == pytest.approx(full, abs=0.01)
    assert ev.mind_ncc(shifted, img, mask) == pytest.approx(masked, abs=0.01)
    with pytest.raises(ValueError, match='mask is empty'):
        ev.mind_ncc(img, img, np.zeros(img.shape, bool))


def test_jacobian_of_linear_field_and_slabs(monkeypatch):
    """u(x) = G x on a 2 mm grid: det(I + G) everywhere (central differences are exact)."""
    grad = np.array([[0.1, 0.02, 0.0], [0.0, -0.05, 0.01], [0.03, 0.0, 0.2]])
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    ijk = np.stack(np.meshgrid(*[np.arange(6)] * 3, indexing='ij'), -1).astype(float)
    field = (ijk * 2.0 @ grad.T).astype(np.float32)
    det = ev.jacobian_determinant(field, aff)
    assert np.allclose(det, np.linalg.det(np.eye(3) + grad), atol=1e-5)
    scale = np.diag([1.1, 1.0, 1.0, 1.0])
    assert np.allclose(ev.jacobian_determinant(field, aff, scale), 1.1 * det, atol=1e-5)
    wavy = np.sin(ijk).astype(np.float32)
    whole = ev.jacobian_determinant(wavy, aff)
    monkeypatch.setattr(ev, '_JACOBIAN_SLAB_VOXELS', 36)  # one x-slice per slab
    assert np.allclose(ev.jacobian_determinant(wavy, aff), whole, atol=1e-6)
    with pytest.raises(ValueError, match='field must be'):
        ev.jacobian_determinant(field[..., :2], aff)


def test_jacobian_stats_and_transforms():
    det = np.ones((4, 4, 4))
    det[0, 0, 0] = -0.5
    det[1, 1, 1] = np.e
    stats = ev.jacobian_stats(det)
    assert stats['folding_pct'] == pytest.approx(100 / 64)
    logs = np.r_[np.zeros(62), 1.0]
    assert stats['logjac_sd'] == pytest.approx(logs.std())
    grid = Geometry((8, 8, 8), np.diag([2.0, 2.0, 2.0, 1.0]))
    linear = Transform(affine=np.diag([1.2, 1.0, 0.5, 1.0]), reference=grid)
    jac, on = ev.transform_jacobian(linear)
    assert on == grid and np.allclose(jac, 0.6)
    # A field stored on a coarser grid, evaluated on the reference grid, and on its own grid.
    coarse = Geometry((4, 4, 4), np.diag([4.0, 4.0, 4.0, 1.0]))
    ijk = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing='ij'), -1).astype(float)
    grad = np.diag([0.1, -0.1, 0.05])
    deform = Transform(affine=np.diag([2.0, 1.0, 1.0, 1.0]), field=(ijk * 4.0) @ grad.T,
                       field_geometry=coarse, reference=grid)
    own, _ = ev.transform_jacobian(deform, coarse)
    assert np.allclose(own, 2.0 * np.linalg.det(np.eye(3) + grad), atol=1e-5)
    on_ref, _ = ev.transform_jacobian(deform)
    inside = on_ref[1:6, 1:6, 1:6]  # away from where the field ends (zero outside its grid)
    assert np.allclose(inside, 2.0 * np.linalg.det(np.eye(3) + grad), atol=1e-4)


@pytest.fixture(scope='module')
def moved_by_header(shared_data, tmp_path_factory):
    """sub-01's T1w and labels with a header moved by a known affine, and that transform."""
    tmp = tmp_path_factory.mktemp('evaluate')
    anat = shared_data / 'bids' / 'sub-01' / 'anat'
    t1w = anat / 'sub-01_T1w.nii.gz'
    labels = (shared_data / 'bids' / 'derivatives' / 'dlmuse' / 'sub-01' / 'anat'
              / 'sub-01_space-T1w_desc-dlmuse_dseg.nii.gz')
    angle = np.deg2rad(10)
    motion = np.array([[np.cos(angle), -np.sin(angle), 0, 6.0],
                       [np.sin(angle), np.cos(angle), 0, -4.0], [0, 0, 1, 3.0], [0, 0, 0, 1]])
    files = {}
    for name, path in (('moving', t1w), ('moving_labels', labels)):
        img = nb.load(path)
        files[name] = tmp / f'{name}.nii.gz'
        nb.save(nb.Nifti1Image(np.asanyarray(img.dataobj), motion @ img.affine, img.header),
                files[name])
    fixed = nb.load(t1w)
    files['trans'] = save_transform(
        Transform(affine=motion, reference=Geometry.from_image(fixed)), tmp / 'fwd.txt')
    return t1w, labels, files, tmp


def test_evaluate_files_with_known_transform(moved_by_header):
    t1w, labels, files, _ = moved_by_header
    right = ev.evaluate_files(t1w, files['moving'], files['trans'], fixed_labels=labels,
                              moving_labels=files['moving_labels'])
    assert right.dice == pytest.approx(1.0, abs=1e-6)
    assert right.mind_ncc > 0.99 and right.folding_pct == 0.0
    assert right.logjac_sd == pytest.approx(0.0, abs=1e-6)
    wrong = ev.evaluate_files(t1w, files['moving'], fixed_labels=labels,
                              moving_labels=files['moving_labels'], largest=20)
    assert len(wrong.dice_labels) == 20 and wrong.dice < 0.8
    assert wrong.mind_ncc < right.mind_ncc - 0.2
    assert wrong.logjac_sd is None


def test_evaluate_command(moved_by_header, capsys):
    t1w, labels, files, tmp = moved_by_header
    out = tmp / 'figures.json'
    code = main(['evaluate', '-f', str(t1w), '-m', str(files['moving']), '-t',
                 str(files['trans']), '--fixed-labels', str(labels), '--moving-labels',
                 str(files['moving_labels']), '--labels', '4,11,23', '--per-label', '-j',
                 str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert 'mind_ncc' in text and 'dice 23' in text
    figures = json.loads(out.read_text())
    assert set(figures['dice_labels']) <= {'4', '11', '23'}
    assert figures['dice'] == pytest.approx(1.0)
    bad = tmp / 'broken.nii.gz'
    bad.write_bytes(b'not an image')
    assert main(['evaluate', '-f', str(t1w), '-m', str(bad)]) == 1
    assert str(bad) in capsys.readouterr().err
    assert main(['evaluate', '-f', str(t1w), '--moving-labels', str(labels)]) == 1
    with pytest.raises(SystemExit):
        main(['evaluate', '-f', str(t1w), '-m', str(t1w), '--labels', 'x'])
