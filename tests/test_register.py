"""The registration API: world-space results, mid-space symmetry, orientation invariance."""

import nibabel as nb
import numpy as np
import pytest
import torch
from torch import nn

from synthmorph_app.engine import spatial
from synthmorph_app.engine.register import (
    _mid_field,
    _moving_fov,
    _velocity_factors,
    _weight_box,
    moved_image,
    register,
)
from synthmorph_app.io.images import Geometry

RNG = np.random.default_rng(42)


class FixedAffine(nn.Module):
    """A network stand-in whose output is a given voxel matrix (tests the pipeline's math)."""

    def __init__(self, matrix=None):
        super().__init__()
        self.register_buffer('matrix', torch.as_tensor(
            np.eye(4) if matrix is None else matrix, dtype=torch.float32))

    def forward(self, moving, fixed):
        return self.matrix[None].expand(moving.shape[0], 4, 4)


class FixedVelocity(nn.Module):
    """Outputs a given smooth half-resolution velocity field, or zero."""

    def __init__(self, amplitude=0.0):
        super().__init__()
        self.amplitude = amplitude

    def half_to_full(self):
        return np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1.0]])

    def forward(self, source, target, lam):
        shape = tuple(s // 2 for s in source.shape[2:])
        gen = torch.Generator().manual_seed(3)
        coarse = torch.randn((1, 3, 4, 4, 4), generator=gen) * self.amplitude
        v = spatial.resize_field(coarse, shape)
        # antisymmetric in the inputs' order, as a trained network is (D(m,f) ~ -D(f,m))
        sign = 1.0 if float(source.mean()) >= float(target.mean()) else -1.0
        return sign * v


def _card(kind):
    return {'name': f'test-{kind}', 'trained': False, 'space': {'voxel_size': 4.0, 'divisor': 8}}


def _phantom(geom, centres, sigmas):
    """A smooth analytic image sampled at the world coordinates of ``geom``."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in geom.shape], indexing='ij'), -1)
    xyz = ijk @ geom.affine[:3, :3].T + geom.affine[:3, 3]
    out = np.zeros(geom.shape)
    for c, s in zip(centres, sigmas):
        out += np.exp(-(((xyz - c) / s) ** 2).sum(-1) / 2)
    return nb.Nifti1Image(out.astype(np.float32), geom.affine)


CENTRES = [np.array(c) for c in ([0, 0, 0], [20, -10, 5], [-15, 12, -8], [5, 25, 18])]
SIGMAS = [np.array(s) for s in ([25, 20, 18], [10, 8, 12], [9, 11, 7], [8, 8, 8])]


def _grid(orient, shape=(40, 44, 36), vox=2.5, rotate=0.0):
    codes = {'RAS': np.eye(3), 'LPS': np.diag([-1.0, -1.0, 1.0]), 'LIA': spatial.LIA}
    lin = codes[orient] * vox
    if rotate:
        a = np.deg2rad(rotate)
        rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        lin = rot @ lin
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = -lin @ ((np.array(shape) - 1) / 2) + [2.0, -3.0, 1.0]
    return Geometry(shape, aff)


def _models(affine_net, velocity_net):
    return {'affine': (affine_net, _card('affine')), 'rigid': (affine_net, _card('rigid')),
            'deform': (velocity_net, _card('deform'))}


def test_identity_networks_give_identity_transforms():
    fixed = _phantom(_grid('RAS'), CENTRES, SIGMAS)
    moving = _phantom(_grid('LPS', shape=(36, 40, 40), vox=2.2), CENTRES[::-1], SIGMAS)
    for mode in ('joint', 'affine', 'rigid', 'deform'):
        res = register(moving, fixed, mode=mode, extent=128, refine=0,
                       weights=_models(FixedAffine(), FixedVelocity()))
        pts = RNG.uniform(-40, 40, (500, 3))
        assert np.abs(res.forward.map_points(pts) - pts).max() < 1e-5, mode
        assert np.abs(res.inverse.map_points(pts) - pts).max() < 1e-5, mode


def test_network_voxel_matrix_becomes_world_matrix():
    """A translation of 2 network voxels (8 mm at 4 mm) along the first (L) axis of LIA grids."""
    mat = np.eye(4)
    mat[0, 3] = 2.0
    fixed = _phantom(_grid('RAS'), CENTRES, SIGMAS)
    res = register(fixed, fixed, mode='affine', extent=128, refine=0,
                   weights=_models(FixedAffine(mat), FixedVelocity()))
    expected = np.eye(4)
    expected[0, 3] = -8.0  # LIA: +i is towards Left, i.e. -x in RAS
    assert np.allclose(res.forward.affine, expected, atol=1e-5)
    assert np.allclose(res.inverse.affine, np.linalg.inv(expected), atol=1e-5)


def test_joint_forward_and_inverse_are_consistent():
    mat = np.eye(4)
    mat[:3, :3] = np.array([[1.02, 0.05, 0], [-0.05, 0.98, 0.02], [0, -0.02, 1.0]])
    mat[:3, 3] = [1.0, -0.5, 0.7]
    fixed = _phantom(_grid('RAS'), CENTRES, SIGMAS)
    moving = _phantom(_grid('LIA', shape=(40, 40, 40)), CENTRES, SIGMAS[::-1])
    res = register(moving, fixed, mode='joint', extent=128, refine=0,
                   weights=_models(FixedAffine(mat), FixedVelocity(amplitude=0.1)))
    assert not res.forward.is_linear
    assert np.abs(res.forward.field).max() > 0.5  # the field moves things by mm
    # points well inside both grids: T_inv(T(x)) == x
    pts = RNG.uniform(-20, 20, (300, 3))
    round_trip = res.inverse.map_points(res.forward.map_points(pts))
    error = np.linalg.norm(round_trip - pts, axis=1)  # mm; motion up to about 9 mm, and the
    assert error.max() < 0.3 and np.median(error) < 0.06  # velocity grid has 8 mm voxels


def test_mid_space_halves_the_transform():
    """Both images meet halfway: forward(to_fixed(z)) == to_moving(z) for mid-space points z,
    and the mid-space warps are halves of the forward one (linear: H @ H = A)."""
    mat = np.eye(4)
    mat[:3, :3] = np.array([[1.03, 0.06, 0], [-0.06, 0.97, 0.02], [0, -0.02, 1.0]])
    mat[:3, 3] = [2.0, -1.0, 1.5]
    fixed = _phantom(_grid('RAS'), CENTRES, SIGMAS)
    moving = _phantom(_grid('LIA', shape=(40, 40, 40)), CENTRES, SIGMAS[::-1])
    weights = _models(FixedAffine(mat), FixedVelocity(amplitude=0.1))
    pts = RNG.uniform(-20, 20, (300, 3))
    for mode in ('affine', 'joint'):
        res = register(moving, fixed, mode=mode, extent=128, refine=0, weights=weights)
        to_moving, to_fixed = res.mid_space()
        assert np.allclose(to_moving.affine @ to_moving.affine, res.forward.affine, atol=1e-8)
        assert to_moving.reference == to_fixed.reference
        direct = to_moving.map_points(pts)
        via_fixed = res.forward.map_points(to_fixed.map_points(pts))
        error = np.linalg.norm(direct - via_fixed, axis=1)  # mm; warps up to 9 mm on an 8 mm
        assert error.max() < 0.6 and np.median(error) < 0.06, mode  # velocity grid
        if mode == 'joint':
            half = np.linalg.norm(to_moving.displacement_at(pts), axis=1)
            full = np.linalg.norm(res.forward.displacement_at(pts), axis=1)
            assert 0.35 < np.median(half) / np.median(full) < 0.65  # about half the warp


def test_refine_level_finer_than_the_network_grid():
    """A refinement level finer than the network's grid runs on a finer mid-space grid, and
    forward and inverse stay consistent."""
    fixed = _phantom(_grid('RAS'), CENTRES, SIGMAS)
    moving = _phantom(_grid('LIA', shape=(40, 40, 40)), CENTRES, SIGMAS[::-1])
    weights = _models(FixedAffine(), FixedVelocity(amplitude=0.1))
    res = register(moving, fixed, mode='deform', extent=128, weights=weights, refine=3,
                   refine_levels=(8.0, 2.5), refine_weight='none')
    # the network grid has 4 mm voxels (32^3); the velocity now lives on a 2.5 mm grid
    assert np.allclose(res.mid_space()[0].field_geometry.voxel_sizes, 2.5)
    pts = RNG.uniform(-15, 15, (200, 3))
    back = res.inverse.map_points(res.forward.map_points(pts))
    # within 0.1 voxel of the 2.5 mm grid (exp(+-v) are integrated on the 5 mm field grid)
    assert np.median(np.linalg.norm(back - pts, axis=1)) < 0.25


def test_finest_field_follows_the_input_resolution():
    """The refined field is at twice each level's spacing, except at the finest level, where
    it is at twice the finer input's voxel size (between one and two times the level's)."""
    def geom(*vox):
        return Geometry((8, 8, 8), np.diag([*vox, 1.0]))

    assert _velocity_factors((8.0, 4.0, 2.0), geom(2, 2, 2), geom(2, 2, 2)) == (2.0, 2.0, 2.0)
    assert _velocity_factors((8.0, 4.0, 2.0), geom(1, 1, 1), geom(2, 2, 2)) == (2.0, 2.0, 1.0)
    assert _velocity_factors((8.0, 4.0, 2.0), geom(0.5, 0.5, 0.5), geom(1, 1, 1))[-1] == 1.0
    # an anisotropic slab counts by its mean voxel side (0.9 x 0.9 x 2.4 mm: about 1.25 mm)
    assert _velocity_factors((8.0, 4.0, 2.0), geom(0.9, 0.9, 2.4), geom(2, 2, 2))[-1] == \
        pytest.approx(2 * (0.9 * 0.9 * 2.4) ** (1 / 3) / 2)
    # the finest level need not be the last one given
    assert _velocity_factors((2.0, 4.0), geom(1, 1, 1), geom(1, 1, 1)) == (1.0, 2.0)


def _reorient(img, codes):
    ornt = nb.orientations.ornt_transform(
        nb.orientations.io_orientation(img.affine), nb.orientations.axcodes2ornt(codes))
    return img.as_reoriented(ornt)


def _head(geom, centres, sigmas, radius=80.0):
    """A smooth 'head' that fades to zero within ``radius`` mm of the origin, so any storage
    grid that contains that sphere holds the whole object."""
    img = _phantom(geom, centres, sigmas)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in geom.shape], indexing='ij'), -1)
    r = np.linalg.norm(ijk @ geom.affine[:3, :3].T + geom.affine[:3, 3], axis=-1)
    w = np.clip((radius - r) / 25.0, 0, 1)
    return nb.Nifti1Image((img.get_fdata() * w * w * (3 - 2 * w)).astype(np.float32),
                          geom.affine)


HEAD_CENTRES = [np.array(c) for c in ([0, 0, 0], [30, -20, 10], [-25, 20, -15])]
HEAD_SIGMAS = [np.full(3, s) for s in (40.0, 25.0, 28.0)]


def _register_and_move(moving, fixed, reference):
    res = register(moving, fixed, mode='joint', extent=192, refine=0)  # packaged weights
    return moved_image(reference, res.forward).get_fdata()


@pytest.fixture(scope='module')
def orientation_case():
    fixed = _head(_grid('RAS', shape=(56, 56, 56), vox=3.0), HEAD_CENTRES[::-1], HEAD_SIGMAS)
    moving = _head(_grid('RAS', shape=(60, 64, 58), vox=3.0), HEAD_CENTRES, HEAD_SIGMAS)
    return fixed, moving, _register_and_move(moving, fixed, moving)


@pytest.mark.parametrize('codes', ['LIA', 'LPS', 'PSR'])
def test_orientation_invariance(orientation_case, codes):
    """The same voxels stored in another orientation give the same moved image."""
    fixed, moving, expected = orientation_case
    other = _reorient(moving, codes)
    assert ''.join(nb.aff2axcodes(other.affine)) == codes
    got = _register_and_move(other, fixed, moving)
    assert np.abs(got - expected).max() < 1e-3 * (expected.max() - expected.min())


def test_oblique_storage_invariance(orientation_case):
    """The same object sampled on a 30-degree oblique grid (qform only) gives the same moved
    image. Resampling a smooth object costs well under 1e-3 of its range, but the trained
    deformable network answers such input differences with slightly different fields (about
    3e-3 of the range at worst, 1e-4 on average); mishandled geometry would be off by far more."""
    fixed, moving, expected = orientation_case
    geom = _grid('RAS', shape=(60, 64, 58), vox=3.0, rotate=30)
    oblique = _head(geom, HEAD_CENTRES, HEAD_SIGMAS)
    oblique.set_qform(geom.affine, code=1)
    oblique.set_sform(None, code=0)
    assert not np.allclose(np.abs(oblique.affine[:3, :3]), np.diag([3.0] * 3))
    got = _register_and_move(oblique, fixed, moving)
    error = np.abs(got - expected) / (expected.max() - expected.min())
    assert error.max() < 5e-3 and error.mean() < 5e-4, (error.max(), error.mean())


def test_bad_arguments():
    img = _phantom(_grid('RAS', shape=(16, 16, 16)), CENTRES, SIGMAS)
    with pytest.raises(ValueError, match='mode'):
        register(img, img, mode='bspline')
    with pytest.raises(ValueError, match='lambda'):
        register(img, img, lam=1.5)
    with pytest.raises(ValueError, match='5 steps'):
        register(img, img, steps=3)
    with pytest.raises(ValueError, match='cross_contrast'):
        register(img, img, cross_contrast='T2w')
    for passes in (0, 1.5):
        with pytest.raises(ValueError, match='passes'):
            register(img, img, passes=passes)


def test_moving_fov_leaves_out_what_the_moving_image_does_not_see():
    """The deformable refinement's weight is 0 outside the moving field of view, and within
    ``erode_mm`` of its edge, 1 inside."""
    moving = Geometry((20, 20, 20), np.diag([2.0, 2.0, 2.0, 1.0]))  # 0..38 mm on each axis
    grid = Geometry((40, 40, 40), np.diag([2.0, 2.0, 2.0, 1.0]) @ _shift(-10))  # -20..58 mm
    inside = _moving_fov(torch.ones(1, 1, 20, 20, 20), moving, grid, np.eye(4), erode_mm=4.0)
    profile = inside[0, 0, :, 15, 15].numpy()
    x = -20 + 2 * np.arange(40)  # world x of the grid's voxels
    assert np.all(profile[x < 4] == 0) and np.all(profile[(x >= 4) & (x <= 34)] == 1)
    assert np.all(profile[x > 34] == 0)
    # through a shift of the moving image by 10 mm the window moves with it
    shifted = _moving_fov(torch.ones(1, 1, 20, 20, 20), moving, grid, _shift(10), erode_mm=4.0)
    assert shifted[0, 0, :, 15, 15].numpy()[x == -6] == 1
    # erosion one axis at a time is the 3D box erosion, on an anisotropic grid and an oblique
    # field of view too
    from scipy.spatial.transform import Rotation

    grid = Geometry((36, 30, 24), np.diag([1.5, 2.0, 2.5, 1.0]) @ _shift(-12))
    turn = np.eye(4)
    turn[:3, :3] = Rotation.from_rotvec([0.3, 0.2, -0.4]).as_matrix()
    turn[:3, 3] = (19, 19, 19) - turn[:3, :3] @ (19, 19, 19)
    found = _moving_fov(torch.ones(1, 1, 20, 20, 20), moving, grid, turn, erode_mm=4.0)
    seen = (spatial.resample_linear(torch.ones(1, 1, 20, 20, 20), moving, grid, matrix=turn)
            > 0.999).float()
    # radii round(4 mm / voxel): 3, 2, 2
    box = torch.nn.functional.max_pool3d(-seen, (7, 5, 5), stride=1, padding=(3, 2, 2))
    assert 0 < float(found.sum()) < float(seen.sum())
    assert torch.equal(found, -box)


@pytest.mark.slow
def test_storage_order_of_real_images_changes_nothing(shared_data):
    """A real head (LPS) and template (LAS) stored in other orientations (PIR, RSA) give the same
    joint registration with refinement, to float rounding: the engine reads every image in LIA
    voxel order. Before, masks, block averages and intensity samples followed each image's
    storage, and this pair moved by 0.6 mm on average and by up to 14 mm where cortex is
    ambiguous. The field on the template's grid comes back in the order the template is stored.
    """
    from synthmorph_app.io.images import load_image

    moving = load_image(shared_data / 'bids' / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz')
    tpl = shared_data / 'templateflow' / 'tpl-MNI152NLin6Asym'
    fixed = load_image(tpl / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz')
    options = {'mode': 'joint', 'refine': 4, 'refine_levels': (8.0, 4.0)}
    first = register(moving, fixed, **options)
    fixed_rsa = _reorient(fixed, 'RSA')
    second = register(_reorient(moving, 'PIR'), fixed_rsa, **options)

    assert second.forward.reference == Geometry.from_image(fixed_rsa)
    assert second.forward.field_geometry == Geometry.from_image(fixed_rsa)
    stored = _reorient(nb.Nifti1Image(first.forward.field, fixed.affine), 'RSA')
    np.testing.assert_allclose(second.forward.field, stored.get_fdata(), atol=1e-4)
    mask = nb.load(tpl / 'tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz')
    pts = nb.affines.apply_affine(mask.affine, np.argwhere(mask.get_fdata() > 0)[::200])
    for a, b in ((first.forward, second.forward), (first.inverse, second.inverse)):
        if a is first.inverse:
            pts = first.forward.map_points(pts)
        gap = np.linalg.norm(a.map_points(pts) - b.map_points(pts), axis=1)
        assert gap.max() < 1e-3, gap.max()


def _shift(mm):
    mat = np.eye(4)
    mat[:3, 3] = mm
    return mat


def _dice(a, b):
    labels = [v for v in np.unique(b) if v > 0]
    return np.mean([2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum())
                    for v in labels])


def _dlmuse(bids, sub: str):
    """The DLMUSE label map of ``sub`` in the shared BIDS dataset (its T1w space)."""
    path = f'derivatives/dlmuse/sub-{sub}/anat/sub-{sub}_space-T1w_desc-dlmuse_dseg.nii.gz'
    return nb.load(str(bids / path))


def _t1w_pair(shared_data, moving: str, fixed: str):
    """Two whole-head T1w of the shared BIDS dataset and their DLMUSE label maps:
    ``(moving, fixed, moving_labels, fixed_labels)``."""
    from synthmorph_app.io.images import load_image

    bids = shared_data / 'bids'
    images = [load_image(bids / f'sub-{s}' / 'anat' / f'sub-{s}_T1w.nii.gz')
              for s in (moving, fixed)]
    return (*images, _dlmuse(bids, moving), _dlmuse(bids, fixed))


@pytest.mark.slow
def test_refine_registers_real_cross_subject_pair(shared_data):
    """Joint + refinement of two real whole-head T1w (2 mm, with neck, LPS) at the default
    levels beats the networks alone by far, and gives a diffeomorphic, inverse-consistent
    result (the field on the fixed image's 2 mm grid: with only the coarse levels it would stay
    on the 4 mm grid of the trained network, a coarser field)."""
    moving, fixed, mlab, flab = _t1w_pair(shared_data, '03', '04')
    res = register(moving, fixed, mode='joint', refine=10)
    assert res.forward.field_geometry.shape == flab.shape
    moved = moved_image(mlab, res.forward, mode='nearest').get_fdata()
    dice = _dice(moved, flab.get_fdata())
    assert dice > 0.5, dice  # greedy reaches about 0.6 on such pairs, no registration < 0.2
    assert res.info['refine']['iterations'] == 10
    # auto: two T1w are one contrast (local NCC, lambda as asked)
    assert res.info['refine']['deformable'] == {'metric': 'lncc', 'cross_contrast': False,
                                                'lambda': 0.5, 'levels': [8.0, 4.0, 2.0, 1.5]}
    # the deformable stage weighs the head (DEFORM_WEIGHT), more than the rough brain weight,
    # at that weight's strength per voxel
    assert 1.2 < res.info['refine']['similarity_scale'] < 3, res.info['refine']
    for kind, card in res.info['models'].items():  # random networks would be left out
        assert card['used'] is bool(card['trained']), kind
    pts = np.argwhere(flab.get_fdata() > 0)[::500] @ flab.affine[:3, :3].T + flab.affine[:3, 3]
    back = res.inverse.map_points(res.forward.map_points(pts))
    error = np.linalg.norm(back - pts, axis=1)  # mm on a 2 mm grid: within 0.1 voxel on average
    assert error.mean() < 0.2 and np.median(error) < 0.15, (error.mean(), np.median(error))


@pytest.mark.slow
def test_wrong_header_half_turn(shared_data):
    """A header that turns the head by 180 degrees about the vertical (x and y flipped, as when
    LPS data are labelled RAS) and also pitches it by 35 degrees: the affine search finds the
    turn and the tilt together (a pure turn is too far from the answer for its short
    optimisation), and the deformable stage runs on a matrix that may have no real square root
    (its mid space then falls back to the fixed space)."""
    from scipy.spatial.transform import Rotation

    moving, fixed, mlab, flab = _t1w_pair(shared_data, '01', '02')
    header = np.diag([-1.0, -1.0, 1.0, 1.0])
    header[:3, :3] = header[:3, :3] @ Rotation.from_euler('x', 35, degrees=True).as_matrix()
    moving = nb.Nifti1Image(moving.get_fdata(dtype=np.float32), header @ moving.affine)
    mlab = nb.Nifti1Image(np.asarray(mlab.dataobj), header @ mlab.affine)
    res = register(moving, fixed, mode='joint', refine=5)
    dice = _dice(moved_image(mlab, res.forward, mode='nearest').get_fdata(), flab.get_fdata())
    assert dice > 0.5, dice  # about 0.6 with the right header; a missed turn scores about 0.1


@pytest.mark.parametrize('kind', ['affine', 'rigid'])
def test_shipped_linear_network_registers_a_real_pair_alone(shared_data, kind):
    """The packaged affine and rigid networks are trained: on their own (``refine=0``) they
    bring a real cross-subject whole-head pair far closer than no registration does (brain Dice
    of the DLMUSE labels on 01->02; about 0.28 (affine) and 0.23 (rigid) against 0.06 with the
    weights shipped in session 6)."""
    from synthmorph_app.engine.weights import load_model
    from synthmorph_app.io.transforms import Transform

    _, card = load_model('default', kind)
    assert card['trained'] is True and card['training']['steps'] > 0
    moving, fixed, mlab, flab = _t1w_pair(shared_data, '01', '02')
    res = register(moving, fixed, mode=kind, refine=0)
    assert res.info['models'][kind]['used'] is True
    if kind == 'rigid':  # a rotation and a shift: no scaling or shear
        linear = res.forward.affine[:3, :3]
        assert np.allclose(linear @ linear.T, np.eye(3), atol=1e-4)
    network = _dice(moved_image(mlab, res.forward, mode='nearest').get_fdata(), flab.get_fdata())
    identity = Transform(affine=np.eye(4), reference=res.forward.reference,
                         moving=res.forward.moving)
    none = _dice(moved_image(mlab, identity, mode='nearest').get_fdata(), flab.get_fdata())
    assert network > none + 0.12, (network, none)


def test_shipped_deform_network_registers_a_real_pair_alone(shared_data):
    """The packaged deformable network is trained: after the affine network, on its own
    (``refine=0``), it brings a real cross-subject whole-head pair clearly closer than the affine
    network alone (brain Dice of the DLMUSE labels on 01->02: about 0.34 against 0.28 with the
    session-7 network), without folding in the brain."""
    from synthmorph_app.engine.weights import load_model
    from synthmorph_app.evaluate import jacobian_stats, transform_jacobian

    _, card = load_model('default', 'deform')
    assert card['trained'] is True and card['training']['steps'] > 0
    moving, fixed, mlab, flab = _t1w_pair(shared_data, '01', '02')
    scores = {}
    for mode in ('affine', 'joint'):
        res = register(moving, fixed, mode=mode, refine=0)
        moved = moved_image(mlab, res.forward, mode='nearest').get_fdata()
        scores[mode] = _dice(moved, flab.get_fdata())
    assert res.info['models']['deform']['used'] is True
    assert res.forward.field is not None and np.abs(res.forward.field).max() > 1.0  # mm
    assert scores['joint'] > scores['affine'] + 0.04, scores
    det, _ = transform_jacobian(res.forward)
    assert jacobian_stats(det, flab.get_fdata() > 0)['folding_pct'] < 0.1


def test_second_network_pass_brings_a_real_pair_closer(shared_data):
    """``passes=2`` runs the deformable network again on the image the first pass moved and
    adds its velocity: on its own (``refine=0``) it brings a real cross-subject pair closer
    than one pass (03->04, DLMUSE labels: about 0.39 -> 0.44 in ``refine_bench.py``; 11 of the
    12 pairs gained), still without folding in the brain, and the inverse still inverts it."""
    from synthmorph_app.evaluate import jacobian_stats, transform_jacobian

    moving, fixed, mlab, flab = _t1w_pair(shared_data, '03', '04')
    scores, fields = {}, {}
    for passes in (1, 2):
        res = register(moving, fixed, mode='joint', refine=0, passes=passes)
        assert res.info['models']['deform']['passes'] == passes
        moved = moved_image(mlab, res.forward, mode='nearest').get_fdata()
        scores[passes] = _dice(moved, flab.get_fdata())
        fields[passes] = res.forward.field
    assert scores[2] > scores[1] + 0.02, scores
    assert np.abs(fields[2] - fields[1]).max() > 0.5  # mm: the second pass moved something
    det, _ = transform_jacobian(res.forward)
    assert jacobian_stats(det, flab.get_fdata() > 0)['folding_pct'] < 0.1
    pts = np.argwhere(flab.get_fdata() > 0)[::2000] @ flab.affine[:3, :3].T + flab.affine[:3, 3]
    back = res.inverse.map_points(res.forward.map_points(pts))
    assert np.linalg.norm(back - pts, axis=1).mean() < 0.2


def test_shipped_deform_network_follows_lambda(shared_data):
    """The packaged hypernetwork turns lambda into smoothness on its own (``refine=0``): on a
    real cross-subject pair the spread of the log Jacobian in the brain falls as lambda grows
    (01->02: about 0.077 / 0.073 / 0.059 at 0.1 / 0.5 / 0.9 with the session-10 network after the
    session-12 affine network, 0.075 / 0.070 / 0.055 after the session-11 one, 0.082 / 0.080 /
    0.065 after the session-10 one; the session-9 network, whose dead ReLUs made it deaf above
    0.5, changed by about 1 %)."""
    from synthmorph_app.evaluate import jacobian_stats, transform_jacobian

    moving, fixed, _, flab = _t1w_pair(shared_data, '01', '02')
    brain = flab.get_fdata() > 0
    spread = {}
    for lam in (0.1, 0.5, 0.9):
        res = register(moving, fixed, mode='joint', lam=lam, refine=0)
        det, _ = transform_jacobian(res.forward)
        spread[lam] = jacobian_stats(det, brain)['logjac_sd']
    assert spread[0.1] > spread[0.5] > spread[0.9], spread
    assert spread[0.9] < 0.93 * spread[0.1], spread


@pytest.mark.slow
def test_rigid_recovers_a_slab_of_the_same_head(shared_data):
    """A 40 mm coronal slab cut from a real brain image (bert's skull-stripped ``norm.mgz``: a
    partial field of view, as a high-resolution slab is) and moved by a known rigid transform
    in its header comes back onto the whole brain within a millimetre. With the contrast judged
    at the centres of mass only, the slab's empty surroundings looked like another contrast,
    MIND was chosen, and it missed by 70 mm."""
    mri = shared_data / 'freesurfer' / 'bert' / 'mri'
    head = nb.load(str(mri / 'norm.mgz'))
    brain = np.asarray(nb.load(str(mri / 'aseg.mgz')).dataobj) > 0
    data = np.asarray(head.dataobj, dtype=np.float32)
    anterior = 2  # conformed LIA: the third voxel axis runs along A
    cut = [slice(None)] * 3
    cut[anterior] = slice(108, 148)  # 40 mm about the middle of the 256 mm FOV
    shift = np.eye(4)
    shift[anterior, 3] = 108
    from scipy.spatial.transform import Rotation

    turn = np.eye(4)
    turn[:3, :3] = Rotation.from_euler('XZ', [10, -8], degrees=True).as_matrix()
    true = _shift([6.0, -4.0, 5.0]) @ turn
    slab = nb.Nifti1Image(data[tuple(cut)], true @ head.affine @ shift)
    res = register(slab, nb.Nifti1Image(data, head.affine), mode='rigid', refine=15)
    pts = np.argwhere(brain[tuple(cut)])[::50] + shift[:3, 3]
    ras = pts @ head.affine[:3, :3].T + head.affine[:3, 3]
    error = np.linalg.norm(res.forward.map_points(ras) - (ras @ true[:3, :3].T + true[:3, 3]),
                           axis=1)
    assert error.mean() < 1.0, error.mean()



@pytest.mark.slow
def test_rigid_slab_of_another_contrast_lands_where_the_whole_image_does(shared_data):
    """A 40 mm axial slab (20 slices) of sub-02's FLAIR, moved 10 degrees and 9 mm in its header,
    onto the same person's T1w lands where the whole FLAIR, moved alike, does. At 8 mm the slab
    is five voxels thick, too few to judge a pose across contrasts: the search there missed by
    25 mm; slabs are searched at 4 mm (``register.SLAB_MM``)."""
    from scipy.spatial.transform import Rotation

    from synthmorph_app.engine import register as reg
    from synthmorph_app.io.images import load_image

    anat = shared_data / 'bids' / 'sub-02' / 'anat'
    flair = load_image(anat / 'sub-02_FLAIR.nii.gz')
    t1w = load_image(anat / 'sub-02_T1w.nii.gz')
    data = flair.get_fdata(dtype=np.float32)
    axis = int(np.argmax(np.abs(flair.affine[2, :3])))  # the voxel axis nearest to superior
    count = 20
    start = (data.shape[axis] - count) // 2
    cut = [slice(None)] * 3
    cut[axis] = slice(start, start + count)
    offset = np.eye(4)
    offset[axis, 3] = start
    turn = np.eye(4)
    turn[:3, :3] = Rotation.from_euler('XZ', [10, -8], degrees=True).as_matrix()
    moved = _shift([6.0, -4.0, 5.0]) @ turn
    slab = nb.Nifti1Image(data[tuple(cut)], moved @ flair.affine @ offset)
    assert reg._is_slab(Geometry.from_image(slab)) and not reg._is_slab(Geometry.from_image(t1w))
    whole = register(nb.Nifti1Image(data, moved @ flair.affine), t1w, mode='rigid', refine=15)
    res = register(slab, t1w, mode='rigid', refine=15)
    # the T1w's head points that fall in the slab by the whole image's registration
    t1 = t1w.get_fdata()
    ras = np.argwhere(t1 > np.percentile(t1, 60))[::20]
    ras = ras @ t1w.affine[:3, :3].T + t1w.affine[:3, 3]
    expected = whole.forward.map_points(ras)
    vox = (expected - slab.affine[:3, 3]) @ np.linalg.inv(slab.affine[:3, :3]).T
    inside = np.all((vox >= 0) & (vox <= np.array(slab.shape) - 1), axis=1)
    assert inside.sum() > 100
    error = np.linalg.norm(res.forward.map_points(ras[inside]) - expected[inside], axis=1)
    assert error.mean() < 1.0, error.mean()


@pytest.mark.slow
def test_image_stored_far_from_the_origin(shared_data):
    """A head stored 300 mm above the world origin (a table position in scanner coordinates):
    the header's own alignment shares nothing with the template, and its empty mean used to
    score 0, a perfect match; the search now leaves such poses out and finds the head."""
    from synthmorph_app.io.images import load_image

    moving, _, _, _ = _t1w_pair(shared_data, '01', '02')
    template = load_image(shared_data / 'templateflow' / 'tpl-MNI152NLin6Asym'
                          / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz')
    data = moving.get_fdata(dtype=np.float32)
    points = np.random.default_rng(1).uniform(-60, 60, (500, 3))
    found = []
    for up in (0.0, 300.0):
        image = nb.Nifti1Image(data, _shift([0.0, 0.0, up]) @ moving.affine)
        res = register(image, template, mode='affine', refine=5)
        found.append(res.forward.map_points(points) - [0.0, 0.0, up])
    assert np.linalg.norm(found[0] - found[1], axis=1).mean() < 0.5


@pytest.mark.slow
def test_a_lesion_mask_keeps_the_brain_around_a_lesion_in_place(shared_data):
    """A fluid-filled cavity (34 ml, as after a stroke) drawn into sub-01's whole-head T1w,
    registered to the MNI template as the BIDS-App registers a T1w: the brain within 15 mm of
    it lands several mm from where the lesion-free image puts it; with the lesion mask
    (filled, left out of the similarity) far closer (``benchmarks/lesion_bench.py`` on 12
    subjects: 1.53 mm against 3.66 on average, 0.27-0.73 of the gap without the mask per
    subject; here 1.8 against 3.2). The mask is named in the info and refused where it marks
    nothing."""
    from scipy import ndimage

    from synthmorph_app.errors import InputImageError

    anat = shared_data / 'bids' / 'sub-01' / 'anat'
    image = nb.load(anat / 'sub-01_T1w.nii.gz')
    labels = np.asarray(nb.load(shared_data / 'bids' / 'derivatives' / 'dlmuse' / 'sub-01'
                                / 'anat' / 'sub-01_space-T1w_desc-dlmuse_dseg.nii.gz').dataobj)
    data = image.get_fdata(dtype=np.float32)
    world = nb.affines.apply_affine(image.affine, np.indices(data.shape).reshape(3, -1).T)
    brain = labels.reshape(-1) > 0
    centre = world[brain].mean(axis=0) + np.array([40.0, 0.0, 20.0])  # right, upper lateral
    lesion = ((np.linalg.norm(world - centre, axis=1) < 20) & brain).reshape(data.shape)
    sick = data.copy()
    sick[lesion] = np.median(data[np.isin(labels, (51, 52))])  # the ventricles' fluid
    tpl = shared_data / 'templateflow' / 'tpl-MNI152NLin6Asym'
    fixed = nb.load(tpl / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz')
    brain_mask = nb.load(tpl / 'tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz')
    options = {'mode': 'joint', 'refine': 15, 'fixed_mask': brain_mask, 'cross_contrast': False}
    clean = register(nb.Nifti1Image(data, image.affine), fixed, **options).forward
    pts = nb.affines.apply_affine(brain_mask.affine,
                                  np.argwhere(brain_mask.get_fdata() > 0)[::10])
    truth = clean.map_points(pts)
    dist = ndimage.distance_transform_edt(~lesion, sampling=image.header.get_zooms()[:3])
    ijk = np.rint(nb.affines.apply_affine(np.linalg.inv(image.affine), truth)).astype(int)
    near = dist[tuple(np.clip(ijk, 0, np.array(data.shape) - 1).T)]
    near = (near > 0) & (near <= 15)
    gaps = {}
    for name, mask in (('plain', None), ('masked', nb.Nifti1Image(lesion.astype(np.uint8),
                                                                   image.affine))):
        res = register(nb.Nifti1Image(sick, image.affine), fixed, moving_lesion_mask=mask,
                       **options)
        gaps[name] = float(np.linalg.norm(res.forward.map_points(pts) - truth,
                                          axis=1)[near].mean())
        assert res.info.get('lesion_masks') == (['moving'] if mask is not None else None)
    assert gaps['plain'] > 3.0, gaps
    assert gaps['masked'] < 0.6 * gaps['plain'], gaps
    nowhere = nb.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4))
    with pytest.raises(InputImageError, match='moving lesion mask marks no voxel'):
        register(nb.Nifti1Image(sick, image.affine), fixed, moving_lesion_mask=nowhere,
                 mode='affine')


def test_a_field_of_view_that_cuts_the_head_is_told_from_a_whole_head(shared_data):
    """``_cut_head`` sends an image whose field of view cuts its head (within the top 140 mm)
    down the slab's 4 mm search; a whole head with its neck cut at the bottom is not such an
    image. sub-01's T1w, whole and cropped 30 mm into the brain from below or from above."""
    from synthmorph_app.engine import register as reg
    from synthmorph_app.io.images import load_image

    t1w = load_image(shared_data / 'bids' / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz')
    data = t1w.get_fdata(dtype=np.float32)
    axis = int(np.argmax(np.abs(t1w.affine[2, :3])))  # the voxel axis nearest to superior
    up = np.sign(t1w.affine[2, axis])

    def cut(lo, hi):
        keep = [slice(None)] * 3
        keep[axis] = slice(lo, hi)
        offset = np.eye(4)
        offset[axis, 3] = lo
        part = data[tuple(keep)]
        return torch.as_tensor(part)[None, None], Geometry(part.shape, t1w.affine @ offset)

    head = np.argwhere(data > np.percentile(data, 70))[:, axis]
    top = head.max() if up > 0 else head.min()  # about the top of the head, in slices
    n = data.shape[axis]
    step = int(30 / abs(t1w.affine[2, axis]))  # 30 mm in slices
    whole = cut(0, n)
    below = cut(top - 4 * step, n) if up > 0 else cut(0, top + 4 * step)  # brain cut from below
    above = cut(0, top - step) if up > 0 else cut(top + step, n)  # the top of the head cut off
    assert not reg._cut_head(*whole)
    assert reg._cut_head(*below) and reg._cut_head(*above)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_registration_matches_cpu():
    """The whole joint registration (networks and refinement) on CUDA lands where the CPU's
    does: brain points mapped within a fraction of a voxel (floating-point order differs)."""
    from synthmorph_app.cli.bids import DEMO_DIR
    from synthmorph_app.engine.register import register
    from synthmorph_app.io.images import load_image
    from synthmorph_app.utils.templates import PACKAGED_HOME

    moving = load_image(DEMO_DIR / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz')
    fixed = load_image(PACKAGED_HOME / 'tpl-MNI152NLin6Asym'
                       / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz')
    cpu = register(moving, fixed, mode='joint', refine=3, device='cpu').forward
    gpu = register(moving, fixed, mode='joint', refine=3, device='cuda').forward
    rng = np.random.default_rng(0)
    points = rng.uniform([-60, -90, -40], [60, 60, 70], size=(2000, 3))  # MNI brain, mm
    gap = np.linalg.norm(cpu.map_points(points) - gpu.map_points(points), axis=1)
    assert float(np.median(gap)) < 0.5 and float(np.percentile(gap, 99)) < 2.0


def test_mid_field_samples_a_box_of_the_mid_grid_directly(monkeypatch):
    """A displacement on a box of the mid-space grid (the refined field) gives the field that
    the same displacement extended onto the whole grid gives, on the image's grid; in slabs of
    rows as in one piece."""
    mid = _grid('LIA', shape=(30, 32, 28), vox=2.0)
    image = _grid('LPS', shape=(24, 26, 22), vox=2.5, rotate=10)
    gen = torch.Generator().manual_seed(5)
    box = torch.randn(1, 3, 18, 20, 15, generator=gen)
    shift = np.eye(4)
    shift[:3, 3] = [5, 4, 7]
    lin = np.eye(4)
    lin[:3, :3] = [[1.02, 0.03, 0], [-0.03, 0.99, 0], [0, 0, 1.01]]
    to_mid = np.linalg.inv(lin)
    whole = spatial.upsample_field(box, shift, mid.shape)
    expected, grid = _mid_field(whole, mid, to_mid, lin, image)
    out, grid_box = _mid_field(box, mid, to_mid, lin, image, disp_to_mid=shift)
    assert grid_box == grid == image
    assert np.abs(expected).max() > 1  # a real field, in mm
    np.testing.assert_allclose(out, expected, atol=1e-4)
    monkeypatch.setattr('synthmorph_app.engine.register.FIELD_CHUNK_VOXELS', 3 * 26 * 22)
    slabs, _ = _mid_field(box, mid, to_mid, lin, image, disp_to_mid=shift)
    np.testing.assert_allclose(slabs, out, atol=1e-4)  # coordinates rounded from another origin


def test_weight_box_holds_the_resampled_weight_and_its_margin():
    """The refinement's working box of the mid-space grid holds every voxel where the fixed
    weight, resampled through a rotation, exceeds the threshold, with the margin around it;
    it is smaller than the grid, and the whole grid where the weight is nowhere."""
    fixed = _grid('LPS', shape=(40, 44, 36), vox=2.5)
    mid = _grid('LIA', shape=(70, 72, 66), vox=2.0, rotate=20)
    weight = torch.zeros(1, 1, *fixed.shape)
    weight[0, 0, 12:25, 15:30, 10:22] = 1.0
    matrix = np.eye(4)
    matrix[:3, 3] = [3.0, -2.0, 4.0]
    lo, hi = _weight_box(weight, fixed, mid, matrix, margin_mm=6.0)
    resampled = spatial.resample_linear(weight, fixed, mid, matrix=matrix)[0, 0].numpy()
    inside = np.argwhere(resampled > 0.01)
    assert inside.size
    pad = int(np.ceil(6.0 / 2.0))
    assert np.all(inside.min(0) - pad >= lo) and np.all(inside.max(0) + 1 + pad <= hi)
    assert np.prod(hi - lo) < 0.5 * np.prod(mid.shape)
    lo0, hi0 = _weight_box(torch.zeros_like(weight), fixed, mid, matrix, margin_mm=6.0)
    assert np.array_equal(lo0, [0, 0, 0]) and np.array_equal(hi0, mid.shape)
