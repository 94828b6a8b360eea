"""Brain masks a user gives (a template's desc-brain_mask) as the refinement's weight."""

import nibabel as nb
import numpy as np
import pytest

from synthmorph_app.engine import masks
from synthmorph_app.engine.register import register
from synthmorph_app.errors import InputImageError
from synthmorph_app.io.images import Geometry


def _grid(shape, voxel, flip=False):
    affine = np.diag([voxel, voxel, voxel, 1.0])
    if flip:  # LPS storage: another orientation of the same world space
        affine[0, 0] = affine[1, 1] = -voxel
    centre = (np.asarray(shape) - 1) / 2
    affine[:3, 3] = -affine[:3, :3] @ centre
    return Geometry(tuple(shape), affine)


def _radius(grid):
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in grid.shape], indexing='ij'), -1)
    xyz = ijk @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    return np.linalg.norm(xyz, axis=-1), xyz


def test_a_brain_mask_on_another_grid_weights_the_head():
    grid = _grid((48, 48, 48), 2.0)
    r, _ = _radius(grid)
    head = np.where(r < 40, 1.0, 0.0) + np.where(r < 30, 1.0, 0.0)  # brain inside a scalp
    mgrid = _grid((64, 64, 64), 1.25, flip=True)
    mr, _ = _radius(mgrid)
    binary = nb.Nifti1Image((mr < 25).astype(np.uint8), mgrid.affine)
    labels = nb.Nifti1Image(np.where(mr < 25, np.where(mr < 10, 41, 2), 0).astype(np.int16),
                            mgrid.affine)
    for mask in (binary, labels):  # a label map counts where it is non-zero
        weight = masks.mask_weight(mask, head, grid)
        assert weight.shape == grid.shape
        assert weight[r < 20].min() > 0.95  # the brain counts fully
        assert np.allclose(weight[(r > 30) & (r < 36)], 0.1, atol=0.02)  # the scalp a little
        assert weight[r > 44].max() == 0  # outside the head not at all
    tensor = masks.similarity_weight(head, grid, 'none', mask=binary)
    assert tensor.shape == (1, 1, *grid.shape) and float(tensor.min()) == 0  # mask over kind

    shifted = binary.affine.copy()
    shifted[:3, 3] += 500.0  # the same mask half a metre away
    far = nb.Nifti1Image(binary.get_fdata(), shifted)
    with pytest.raises(InputImageError, match='fixed mask <x.nii.gz> covers no voxel'):
        masks.mask_weight(far, head, grid, what='fixed mask <x.nii.gz>')


def _two_blobs(grid, shift_a=0.0, shift_b=0.0):
    """Two textured blobs along x, at -30 and +30 mm, each moved along x by its shift, in one
    still ellipsoid (one head, as the rough weights expect)."""
    _, xyz = _radius(grid)
    rng = np.random.default_rng(0)
    coarse = rng.random((6, 6, 6))
    out = 0.3 * (((xyz / np.array([58.0, 40.0, 40.0])) ** 2).sum(-1) < 1)
    for cx, shift in ((-30.0, shift_a), (30.0, shift_b)):
        local = xyz - np.array([cx + shift, 0.0, 0.0])
        blob = np.exp(-(local ** 2).sum(-1) / (2 * 12.0 ** 2))
        index = np.clip(((local + 24) / 8).astype(int), 0, 5)
        out += blob * (0.5 + coarse[index[..., 0], index[..., 1], index[..., 2]])
    return out.astype(np.float32)


@pytest.mark.parametrize('side', ['a', 'b'])
def test_the_fixed_mask_decides_which_part_the_refinement_aligns(side):
    """Blob a moved +4 mm and blob b -4 mm along x: no rigid transform aligns both, so the
    fixed mask must decide which one the rigid refinement follows."""
    grid = _grid((64, 48, 48), 2.0)
    fixed = nb.Nifti1Image(_two_blobs(grid), grid.affine)
    moving = nb.Nifti1Image(_two_blobs(grid, 4.0, -4.0), grid.affine)
    _, xyz = _radius(grid)
    centre = -30.0 if side == 'a' else 30.0
    inside = np.linalg.norm(xyz - np.array([centre, 0, 0]), axis=-1) < 15
    mask = nb.Nifti1Image(inside.astype(np.uint8), grid.affine)
    result = register(moving, fixed, mode='rigid', refine=15, init_method='identity',
                      refine_metric='lncc', fixed_mask=mask)
    assert result.info['refine']['masks'] == ['fixed']
    point = np.array([centre, 0.0, 0.0, 1.0])
    found = (result.forward.affine @ point)[:3]
    expected = point[:3] + np.array([4.0 if side == 'a' else -4.0, 0, 0])
    assert np.linalg.norm(found - expected) < 1.5, (found, expected)


def test_a_lesion_mask_on_another_grid_leaves_the_lesion_and_a_rim_out():
    """0 in the lesion and within the 2 mm rim, 1 farther away, wherever the mask's grid
    lies (1 mm LPS mask, 2 mm image); labels count where non-zero; an empty mask, or one in
    another world space, is refused naming it."""
    grid = _grid((40, 40, 40), 2.0)
    r, _ = _radius(grid)
    fine = _grid((80, 80, 80), 1.0, flip=True)
    fine_r, _ = _radius(fine)
    lesion = ((fine_r < 10) * 7).astype(np.int16)  # a label value
    keep = masks.lesion_keep(nb.Nifti1Image(lesion, fine.affine), grid)
    assert keep.shape == grid.shape and keep.dtype == np.float32
    assert keep[r < 11].max() == 0.0
    assert keep[r > 15].min() == 1.0
    no_rim = masks.lesion_keep(nb.Nifti1Image(lesion, fine.affine), grid, margin_mm=0)
    assert no_rim[(r > 11) & (r < 12)].min() > 0.9 and no_rim[r < 9].max() == 0.0
    empty = nb.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4))
    with pytest.raises(InputImageError, match='lesion mask <x.nii> marks no voxel'):
        masks.lesion_keep(empty, grid, what='lesion mask <x.nii>')
    away = nb.Nifti1Image(lesion, fine.affine @ np.array(
        [[1, 0, 0, 500], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]))
    with pytest.raises(InputImageError, match='marks no voxel'):
        masks.lesion_keep(away, grid)


def test_a_head_found_once_gives_the_same_weights_and_belongs_to_its_grid():
    grid = _grid((40, 44, 48), 2.0)
    r, xyz = _radius(grid)
    image = np.where(r < 36, 1.0, 0.0) + np.where(r < 26, 1.0, 0.0) + 0.2 * (xyz[..., 2] > 30)
    mask = nb.Nifti1Image((r < 24).astype(np.uint8), grid.affine)
    found = masks.Head(image, grid)
    for kind in ('brain', 'head', 'none'):
        for m in (None, mask):
            alone = masks.similarity_weight(image, grid, kind, mask=m)
            shared = masks.similarity_weight(image, grid, kind, mask=m, head=found)
            assert np.array_equal(alone.numpy(), shared.numpy()), (kind, m)
    assert masks.head_mask(image, grid, top_mm=None, head=found).sum() > \
        masks.head_mask(image, grid, top_mm=40.0, head=found).sum() > 0
    other = _grid((40, 44, 48), 2.5)
    with pytest.raises(ValueError, match='another grid'):
        masks.brain_weight(image, other, head=found)
