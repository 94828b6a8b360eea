"""The spatial core: grids, world-space resampling, integration, composition, inverses."""

import numpy as np
import pytest
import torch

from synthmorph_app.engine import spatial
from synthmorph_app.io.images import Geometry
from synthmorph_app.io.transforms import Transform

torch.manual_seed(0)
RNG = np.random.default_rng(0)


def _smooth_volume(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1, *(s // 4 for s in shape)), generator=gen)
    return torch.nn.functional.interpolate(x, size=shape, mode='trilinear', align_corners=True)


def _rotation(deg, axis):
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(4)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def test_network_grid_is_lia_centred_isotropic():
    geom = Geometry((100, 120, 80), np.array(
        [[0, 0, 1.2, -40], [-0.9, 0, 0, 60], [0, 1.1, 0, -30], [0, 0, 0, 1.0]]))
    grid = spatial.network_grid(geom, voxel_size=2.0, shape=64)
    assert grid.shape == (64, 64, 64)
    assert np.allclose(grid.voxel_sizes, 2.0)
    assert np.allclose(grid.affine[:3, :3] / 2.0, spatial.LIA)
    assert np.allclose(spatial.fov_center(grid), spatial.fov_center(geom))
    import nibabel as nb

    assert ''.join(nb.aff2axcodes(grid.affine)) == 'LIA'


def test_identity_and_translation_resampling():
    geom = Geometry((20, 22, 24), np.diag([1.5, 1.0, 2.0, 1.0]))
    x = _smooth_volume((20, 22, 24))
    out = spatial.apply_transform(x, geom, Transform(), geom)
    assert torch.allclose(out, x, atol=1e-5)
    shift = np.eye(4)
    shift[0, 3] = 3.0  # two voxels of 1.5 mm
    out = spatial.apply_transform(x, geom, Transform(affine=shift), geom)
    assert torch.allclose(out[0, 0, :-2], x[0, 0, 2:], atol=1e-5)
    assert torch.all(out[0, 0, -2:] == 0)


def test_resampling_does_not_depend_on_storage_orientation():
    """The same object stored flipped and permuted resamples to the same result."""
    data = _smooth_volume((16, 18, 20))
    geom = Geometry((16, 18, 20), np.diag([1.0, 1.0, 1.0, 1.0]))
    # store it as LPS-permuted: flip axis 0 and 1, swap axes 1 and 2
    flipped = data.flip(2).flip(3).permute(0, 1, 2, 4, 3)
    aff = np.zeros((4, 4))
    aff[0, 0] = -1
    aff[0, 3] = 15
    aff[1, 2] = -1
    aff[1, 3] = 17
    aff[2, 1] = 1
    aff[3, 3] = 1
    geom2 = Geometry((16, 20, 18), aff)
    xfm = Transform(affine=_rotation(10, 2))
    a = spatial.apply_transform(data, geom, xfm, geom)
    b = spatial.apply_transform(flipped, geom2, xfm, geom)
    assert torch.allclose(a, b, atol=1e-5)


def test_field_then_affine_order():
    geom = Geometry((10, 10, 10), np.eye(4))
    field = np.zeros((10, 10, 10, 3), np.float32)
    field[..., 0] = 1.0
    rot = _rotation(90, 2)
    xfm = Transform(affine=rot, field=field, field_geometry=geom)
    pts = np.array([[2.0, 3.0, 4.0]])
    # field first: (3, 3, 4), then a 90-degree rotation about z: (-3, 3, 4)
    assert np.allclose(xfm.map_points(pts), [[-3.0, 3.0, 4.0]], atol=1e-6)
    coords = spatial.transform_coords(xfm, geom, geom)
    assert np.allclose(coords[:, 2, 3, 4].numpy(), [-3.0, 3.0, 4.0], atol=1e-5)


def test_labels_resampling_never_invents_labels():
    labels = torch.zeros((1, 1, 12, 12, 12))
    labels[..., 2:6, 2:10, 2:10] = 3
    labels[..., 6:10, 2:10, 2:10] = 7
    geom = Geometry((12, 12, 12), np.eye(4))
    xfm = Transform(affine=_rotation(20, 0))
    out = spatial.apply_transform(labels, geom, xfm, geom, mode='labels')
    assert set(torch.unique(out).tolist()) <= {0.0, 3.0, 7.0}
    lin = spatial.apply_transform(labels, geom, xfm, geom, mode='linear')
    assert len(torch.unique(lin)) > 3  # linear blends labels, which is why 'labels' exists


def test_fill_value_outside():
    geom = Geometry((8, 8, 8), np.eye(4))
    x = torch.ones((1, 1, 8, 8, 8))
    shift = np.eye(4)
    shift[0, 3] = 4
    out = spatial.apply_transform(x, geom, Transform(affine=shift), geom, fill=-5)
    assert torch.all(out[0, 0, :4] == 1) and torch.all(out[0, 0, 4:] == -5)


@pytest.mark.parametrize('on_target', [True, False])
@pytest.mark.parametrize('mode', ['linear', 'nearest', 'labels'])
def test_resampling_in_slabs_equals_one_piece(mode, on_target):
    """Fine targets are resampled in slabs of the first axis; the slabs add up to the whole."""
    rng = np.random.default_rng(3)
    source = Geometry((20, 22, 18), np.array(
        [[-1.2, 0, 0.1, 30], [0, 0, 1.1, -20], [0, -1, 0, 25], [0, 0, 0, 1.0]]))
    target = Geometry((17, 19, 21), np.array(
        [[1, 0, 0, -10], [0, 1.1, 0, -12], [0, 0, 0.9, -8], [0, 0, 0, 1.0]]))
    fgeom = target if on_target else Geometry((9, 10, 11), target.affine @ np.diag([2, 2, 2, 1]))
    shift = np.eye(4)
    shift[:3, 3] = [1, -2, 0.5]
    xfm = Transform(affine=shift, field=rng.normal(0, 2, (*fgeom.shape, 3)),
                    field_geometry=fgeom)
    data = rng.integers(0, 5, (1, 1, 20, 22, 18)) if mode == 'labels' else rng.random(
        (1, 1, 20, 22, 18))
    volume = torch.as_tensor(data, dtype=torch.float32)
    whole = spatial.apply_transform(volume, source, xfm, target, mode, fill=-1.0,
                                    chunk_voxels=10**9)
    slabs = spatial.apply_transform(volume, source, xfm, target, mode, fill=-1.0,
                                    chunk_voxels=3 * 19 * 21 + 5)  # 3 rows: 6 slabs, one short
    assert slabs.shape == (1, 1, *target.shape)
    assert (whole == -1).any() and (whole != -1).any()
    assert torch.equal(whole, slabs)


def test_svf_exp_inverse_consistency_and_resize():
    gen = torch.Generator().manual_seed(1)
    v = torch.randn((1, 3, 6, 6, 6), generator=gen) * 0.3
    v = spatial.resize_field(v, (32, 32, 32))  # smooth, a few voxels of motion
    u = spatial.integrate_svf(v, 7)
    u_inv = spatial.integrate_svf(-v, 7)
    comp = spatial.warp_voxel(u_inv, u, padding='border') + u
    error = comp[..., 6:-6, 6:-6, 6:-6].norm(dim=1)  # |exp(-v)(exp(v)(x)) - x|, voxels
    assert u.abs().max() > 3.0
    assert error.mean() < 0.1 and error.max() < 0.15 * u.abs().max()
    # resize doubles the vectors with the grid (corners aligned)
    small = torch.ones((1, 3, 5, 5, 5))
    big = spatial.resize_field(small, (9, 9, 9))
    assert torch.allclose(big, torch.full_like(big, 2.0))


@pytest.mark.parametrize('n_in', [1, 2, 7])
def test_separable_resize_onto_a_box_is_trilinear_interpolation(n_in):
    """Matrices per axis give ``F.interpolate`` (trilinear, corners aligned) on any box of the
    output grid, forward and backward."""
    gen = torch.Generator().manual_seed(3)
    field = torch.randn((1, 3, n_in, 5, 6), generator=gen, dtype=torch.float64)
    out_shape, lo, hi = (11, 9, 13), (2, 0, 4), (10, 9, 11)
    full = torch.nn.functional.interpolate(field, size=out_shape, mode='trilinear',
                                           align_corners=True)
    mats = [spatial.interpolation_matrix(n, m, a, b, dtype=torch.float64)
            for n, m, a, b in zip(field.shape[2:], out_shape, lo, hi)]
    assert [tuple(m.shape) for m in mats] == [(8, n_in), (9, 5), (7, 6)]
    assert all(torch.allclose(m.sum(1), torch.ones(len(m), dtype=m.dtype)) for m in mats)
    box = spatial.resize_separable(field, mats)
    assert torch.allclose(box, full[..., 2:10, 0:9, 4:11], atol=1e-12)
    weight = torch.randn(box.shape, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (lambda f: spatial.resize_separable(f, mats),
               lambda f: torch.nn.functional.interpolate(
                   f, size=out_shape, mode='trilinear', align_corners=True)[..., 2:10, :, 4:11]):
        f = field.clone().requires_grad_()
        (fn(f) * weight).sum().backward()
        grads.append(f.grad)
    assert torch.allclose(*grads, atol=1e-12)
    with pytest.raises(ValueError, match='rows 3:3'):
        spatial.interpolation_matrix(4, 9, 3, 3)


def test_world_voxel_field_round_trip():
    affine = np.array([[0, 0, 2.0, 1], [-2.0, 0, 0, 2], [0, 1.5, 0, 3], [0, 0, 0, 1]])
    field = torch.randn((1, 3, 4, 5, 6))
    vox = spatial.field_world_to_voxel(field, affine)
    assert torch.allclose(spatial.field_voxel_to_world(vox, affine), field, atol=1e-5)


def test_matrix_sqrt():
    a = _rotation(40, 1) @ np.diag([1.1, 0.9, 1.0, 1.0])
    a[:3, 3] = [10, -5, 3]
    h = spatial.matrix_sqrt(a)
    assert np.allclose(h @ h, a, atol=1e-8)


def test_mid_space_split():
    """Halfway (the square root) as a rule; a half turn with unequal scales has no real square
    root, and the split falls back to the fixed space, still exact."""
    a = _rotation(40, 1) @ np.diag([1.1, 0.9, 1.0, 1.0])
    a[:3, 3] = [10, -5, 3]
    to_moving, to_fixed = spatial.mid_space_split(a)
    assert np.allclose(to_moving @ to_moving, a) and np.allclose(to_moving @ to_fixed, np.eye(4))
    for turn in (np.diag([-1.0, -1.0, 1.0, 1.0]), _rotation(178, 2) @ _rotation(30, 0)):
        b = turn @ np.diag([0.9, 1.1, 1.0, 1.0])
        b[:3, 3] = [3, 20, -7]
        assert not np.allclose(spatial.matrix_sqrt(b) @ spatial.matrix_sqrt(b), b, atol=1e-3)
        to_moving, to_fixed = spatial.mid_space_split(b)
        assert np.allclose(to_moving @ np.linalg.inv(to_fixed), b)
        assert np.allclose(to_fixed, np.eye(4))


def test_input_checks():
    with pytest.raises(ValueError, match='B, C, X, Y, Z'):
        spatial.sample_grid(torch.zeros((4, 4, 4)), torch.zeros((3, 4, 4, 4)))
    with pytest.raises(ValueError, match='velocity'):
        spatial.integrate_svf(torch.zeros((1, 2, 4, 4, 4)))
    with pytest.raises(ValueError, match="mode must be"):
        geom = Geometry((4, 4, 4), np.eye(4))
        spatial.apply_transform(torch.zeros((1, 1, 4, 4, 4)), geom, Transform(), geom, 'cubic')


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_matches_cpu():
    geom = Geometry((16, 16, 16), np.diag([1.2, 1.0, 1.0, 1.0]))
    x = _smooth_volume((16, 16, 16))
    xfm = Transform(affine=_rotation(15, 0))
    cpu = spatial.apply_transform(x, geom, xfm, geom)
    gpu = spatial.apply_transform(x.cuda(), geom, xfm, geom).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-5)
