"""Tests of the test-time optimisers: affine recovery, robust initialisation, SVF registration."""

from __future__ import annotations

import logging

import nibabel as nb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synthmorph_app.engine import masks, optimise, similarity, spatial
from synthmorph_app.engine.optimise import blur
from synthmorph_app.io.images import Geometry, load_image

GEN = torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """One thread: these small volumes run faster without threading on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


RNG = np.random.default_rng(0)

GRID = Geometry((40, 44, 36), np.diag([2.0, 2.0, 2.0, 1.0]))


def _phantom(shape=GRID.shape, generator=GEN) -> torch.Tensor:
    """Smooth random structure (blurred noise) inside a soft ellipsoid, zero outside."""
    noise = blur(torch.rand(1, 1, *shape, generator=generator), (1.2, 1.2, 1.2))
    noise = (noise - noise.mean()) / noise.std()
    coords = spatial.identity_coords(shape)
    centre = torch.tensor([(s - 1) / 2 for s in shape]).view(3, 1, 1, 1)
    radii = torch.tensor([0.4 * s for s in shape]).view(3, 1, 1, 1)
    r = (((coords - centre) / radii) ** 2).sum(0).sqrt()
    inside = torch.sigmoid((1 - r) * 12)[None, None]
    return inside * (1 + 0.3 * noise)


def _velocity(shape=GRID.shape, rms=1.5, generator=GEN) -> torch.Tensor:
    """A smooth random velocity (voxels) of root mean square length ``rms``."""
    v = blur(torch.randn(1, 3, *shape, generator=generator), (3.0, 3.0, 3.0))
    return v * rms / v.norm(dim=1).square().mean().sqrt()


def _inside(shape=GRID.shape, fraction=0.3) -> torch.Tensor:
    coords = spatial.identity_coords(shape)
    centre = torch.tensor([(s - 1) / 2 for s in shape]).view(3, 1, 1, 1)
    radii = torch.tensor([fraction * s for s in shape]).view(3, 1, 1, 1)
    return (((coords - centre) / radii) ** 2).sum(0) < 1


def _log_jacobian_sd(disp: torch.Tensor, mask: torch.Tensor) -> float:
    d = disp[0].numpy()
    grads = np.stack([np.stack(np.gradient(d[c]), 0) for c in range(3)], 0)  # (3, 3, ...)
    jac = np.moveaxis(grads, (0, 1), (-2, -1)) + np.eye(3)
    det = np.linalg.det(jac)[mask.numpy()]
    return float(np.log(np.clip(det, 1e-3, None)).std())


# --------------------------------------------------------------------------------------------
# Deformable


@pytest.fixture(scope='module')
def warped_pair():
    moving = _phantom()
    true_v = _velocity()
    fixed = spatial.warp_voxel(moving, spatial.integrate_svf(true_v))
    return moving, fixed, true_v


def _error(v, true_v, mask):
    err = (spatial.integrate_svf(v) - spatial.integrate_svf(true_v)).norm(dim=1)[0]
    return float(err[mask].mean())


def test_mask_box_and_weighted_centre_match_their_definitions():
    """The box of a mask and a weight's centre of mass, computed without index arrays."""
    rng = np.random.default_rng(4)
    affine = np.array([[0, -1.1, 0, 20], [0.9, 0, 0.2, -30], [0, 0, 1.3, 5], [0, 0, 0, 1.0]])
    grid = Geometry((15, 12, 10), affine)
    mask = np.zeros(grid.shape, bool)
    mask[3:9, 2:11, 5:7] = rng.random((6, 9, 2)) > 0.3
    idx = np.argwhere(mask)
    corners = np.array([[a, b, c] for a in (idx[:, 0].min(), idx[:, 0].max())
                        for b in (idx[:, 1].min(), idx[:, 1].max())
                        for c in (idx[:, 2].min(), idx[:, 2].max())])
    ras = corners @ affine[:3, :3].T + affine[:3, 3]
    lo, hi = optimise._world_bbox(grid, mask)
    assert np.allclose(lo, ras.min(0)) and np.allclose(hi, ras.max(0))
    weight = rng.random(grid.shape) * mask
    ijk = (np.argwhere(np.ones(grid.shape)) * weight.reshape(-1, 1)).sum(0) / weight.sum()
    centre = optimise._weighted_centre(
        grid, torch.as_tensor(weight, dtype=torch.float32)[None, None])
    assert np.allclose(centre, affine[:3, :3] @ ijk + affine[:3, 3], atol=1e-4)


@pytest.mark.parametrize('velocity_factor', [2.0, (2.0, 1.0)])
def test_svf_recovers_known_warp(warped_pair, velocity_factor):
    """Recovered within half a voxel, with the field at twice each level's spacing or, at the
    finest level, at the image's own spacing (what ``register`` does for 1 mm inputs)."""
    moving, fixed, true_v = warped_pair
    mask = _inside()
    before = _error(torch.zeros_like(true_v), true_v, mask)
    v = optimise.optimise_svf(
        moving, fixed, GRID, lam=0.1, metric='lncc', levels=(4, 2), iterations=(60, 60),
        velocity_factor=velocity_factor,
    )
    assert v.shape == (1, 3, *GRID.shape)
    after = _error(v, true_v, mask)
    assert after < 0.5
    assert after < 0.3 * before
    # the inverse is exp(-v): composing forward and inverse gives the identity
    fwd = spatial.integrate_svf(v)
    bwd = spatial.integrate_svf(-v)
    composed = fwd + spatial.warp_voxel(bwd, fwd, padding='border')
    assert float(composed.norm(dim=1)[0][mask].mean()) < 0.1


def test_svf_mind_is_contrast_blind(warped_pair):
    """MIND on an inverted copy does as well as LNCC on the same contrast (within 10 %), at
    one lambda (``auto`` would also raise it across contrasts)."""
    moving, fixed, true_v = warped_pair
    mask = _inside()
    kwargs = {'lam': 0.1, 'levels': (4, 2), 'iterations': (30, 20), 'cross_contrast': False}
    same = _error(
        optimise.optimise_svf(moving, fixed, GRID, metric='lncc', **kwargs), true_v, mask
    )
    inverted = _error(
        optimise.optimise_svf(moving, 2 - fixed, GRID, metric='auto', **kwargs), true_v, mask
    )
    assert inverted < 1.1 * same


def test_svf_identical_images_give_identity():
    image = _phantom()
    v = optimise.optimise_svf(
        image, image, GRID, metric='lncc', levels=(4, 2), iterations=(20, 20)
    )
    disp_mm = spatial.integrate_svf(v).abs().max() * 2.0
    assert float(disp_mm) < 0.01


def test_svf_lambda_is_monotone(warped_pair):
    moving, fixed, _ = warped_pair
    mask = _inside()
    spread = []
    for lam in (0.1, 0.5, 0.9):
        v = optimise.optimise_svf(
            moving, fixed, GRID, lam=lam, metric='lncc', levels=(4, 2), iterations=(40, 20)
        )
        spread.append(_log_jacobian_sd(spatial.integrate_svf(v), mask))
    assert spread[2] < spread[1] < spread[0]


def test_svf_similarity_scale_acts_against_the_smoothness(warped_pair):
    """``similarity_scale`` weighs the dissimilarity against the smoothness: 1 is the plain
    call to the bit; 3 fits the images more closely with a rougher field, as a lower lambda
    would."""
    moving, fixed, _ = warped_pair
    mask = _inside()
    kwargs = {'lam': 0.5, 'metric': 'lncc', 'levels': (4, 2), 'iterations': (20, 10)}
    plain = optimise.optimise_svf(moving, fixed, GRID, **kwargs)
    same = optimise.optimise_svf(moving, fixed, GRID, similarity_scale=1.0, **kwargs)
    assert torch.equal(plain, same)
    sharper = optimise.optimise_svf(moving, fixed, GRID, similarity_scale=3.0, **kwargs)

    def fit(v):
        moved = spatial.warp_voxel(moving, spatial.integrate_svf(v))
        return float(similarity.lncc(moved, fixed))

    assert fit(sharper) > fit(plain)
    spread = [_log_jacobian_sd(spatial.integrate_svf(v), mask) for v in (plain, sharper)]
    assert spread[1] > 1.2 * spread[0]
    with pytest.raises(ValueError, match='similarity_scale'):
        optimise.optimise_svf(moving, fixed, GRID, similarity_scale=0.0, **kwargs)


def test_svf_auto_judges_the_contrasts_inside_the_metric_weight(warped_pair):
    """``metric_weight`` is where ``'auto'`` judges the contrasts: one contrast in one half of
    the fixed image and the inverted one in the other, the similarity weighing both halves."""
    moving, fixed, _ = warped_pair
    half = torch.zeros_like(fixed)
    half[..., : fixed.shape[-1] // 2] = 1
    mixed = torch.where(half > 0, fixed, 2 - fixed)
    kwargs = {'metric': 'auto', 'levels': (4,), 'iterations': (1,)}
    chosen = {}
    for name, judge in (('same', half), ('inverted', 1 - half)):
        report = {}
        optimise.optimise_svf(moving, mixed, GRID, metric_weight=judge, report=report, **kwargs)
        chosen[name] = report['metric']
    assert chosen == {'same': 'lncc', 'inverted': 'mind'}


def test_cross_contrast_lambda():
    """Across contrasts the smoothness weighs CROSS_CONTRAST_FACTOR times more: 0.5 acts as
    0.7, the ends stay, the order is kept."""
    f = optimise.cross_contrast_lambda
    assert f(0.5) == pytest.approx(0.7)
    assert f(0.0) == 0.0 and f(1.0) == 1.0
    lams = np.linspace(0.05, 0.95, 19)
    raised = np.array([f(x) for x in lams])
    assert np.all(raised > lams) and np.all(np.diff(raised) > 0)
    ratio = raised / (1 - raised) / (lams / (1 - lams))
    assert np.allclose(ratio, optimise.CROSS_CONTRAST_FACTOR)


def test_svf_cross_contrast_is_smoother(warped_pair):
    """``cross_contrast`` runs the refinement at the raised lambda (the same field as asking
    for it), is smoother than the same contrast, and ``auto`` takes MIND for different
    contrasts; ``report`` says what was used."""
    moving, fixed, _ = warped_pair
    mask = _inside()
    kwargs = {'levels': (4, 2), 'iterations': (20, 10)}
    reports = {}
    fields = {}
    for across in (False, True):
        reports[across] = {}
        fields[across] = optimise.optimise_svf(
            moving, fixed, GRID, lam=0.5, metric='lncc', cross_contrast=across,
            report=reports[across], **kwargs)
    assert reports[False] == {'metric': 'lncc', 'cross_contrast': False, 'lambda': 0.5}
    assert reports[True]['cross_contrast'] and reports[True]['lambda'] == pytest.approx(0.7)
    raised = optimise.optimise_svf(moving, fixed, GRID, lam=0.7, metric='lncc', **kwargs)
    assert torch.allclose(fields[True], raised)
    spread = {k: _log_jacobian_sd(spatial.integrate_svf(v), mask) for k, v in fields.items()}
    assert spread[True] < 0.9 * spread[False]
    # auto: an inverted contrast picks MIND, which means different contrasts
    report = {}
    optimise.optimise_svf(moving, 2 - fixed, GRID, metric='auto', report=report,
                          levels=(4,), iterations=(2,))
    assert report['metric'] == 'mind' and report['cross_contrast']
    assert report['lambda'] == pytest.approx(0.7)


def test_svf_weight_limits_the_field(warped_pair, caplog):
    moving, fixed, _ = warped_pair
    weight = _inside(fraction=0.2).float()[None, None]
    with caplog.at_level(logging.INFO, logger='synthmorph_app.engine.optimise'):
        v = optimise.optimise_svf(
            moving,
            fixed,
            GRID,
            weight=weight,
            margin_mm=6,
            levels=(4,),
            iterations=(10,),
            verbose=True,
        )
    assert float(v[..., :2].abs().max()) == 0  # outside the weight's box plus margin
    assert any('svf level 4' in r.getMessage() for r in caplog.records)


def test_svf_moving_weight_travels_with_the_moving_image():
    """A moving image with an artefact the fixed one lacks (a bright ball, as a lesion): the
    field near it is pulled off. Filled from its surroundings (``intensity.fill_lesion``) and
    left out by a moving weight (as ``register`` does with a lesion mask), the field comes back
    close to the artefact-free one. A moving weight of zero leaves only the smoothness (no
    field); one of ones changes nothing."""
    from synthmorph_app.engine.intensity import fill_lesion

    own = torch.Generator().manual_seed(0)  # the same pair whatever ran before
    moving = _phantom(generator=own)
    true_v = _velocity(rms=1.0, generator=own)
    true_v[:, 0] += 3.0  # the ball moves 3 voxels: a weight that stayed put would miss it
    truth = spatial.integrate_svf(true_v)
    fixed = spatial.warp_voxel(moving, truth)
    dist = (spatial.identity_coords(GRID.shape)
            - torch.tensor([20.0, 22.0, 18.0]).view(3, 1, 1, 1)).norm(dim=0)
    sick = moving.clone()
    sick[0, 0][dist < 5] = 3.0
    keep = (dist >= 6).float()[None, None]
    # fixed voxels whose moving point lies within 12 voxels of the ball
    near = spatial.warp_voxel(dist[None, None], truth, padding='border')[0, 0] < 12
    kwargs = {'lam': 0.3, 'metric': 'lncc', 'levels': (4, 2), 'iterations': (40, 30)}

    def error(image, **extra):
        v = optimise.optimise_svf(image, fixed, GRID, **kwargs, **extra)
        return float((spatial.integrate_svf(v) - truth).norm(dim=1)[0][near].mean())

    clean, pulled = error(moving), error(sick)
    filled = torch.as_tensor(fill_lesion(sick[0, 0].numpy(), keep[0, 0].numpy(), (2, 2, 2)))
    masked = error(filled[None, None], moving_weight=keep)
    assert pulled > 2 * clean
    assert masked < 0.65 * pulled and masked < 1.5 * clean  # seeds 0-3: 1.2-1.4
    none = optimise.optimise_svf(sick, fixed, GRID, moving_weight=torch.zeros_like(keep),
                                 **kwargs)
    assert float(none.abs().max()) < 1e-3
    ones = optimise.optimise_svf(moving, fixed, GRID, moving_weight=torch.ones_like(keep),
                                 **kwargs)
    plain = optimise.optimise_svf(moving, fixed, GRID, **kwargs)
    inner = _inside()
    assert float((ones - plain).norm(dim=1)[0][inner].max()) < 0.05


def test_svf_cropped_velocity_is_the_same_field(warped_pair):
    """``crop=True`` returns the field on its box and the box's place: embedded in the grid it
    is the default result, and integrated on the box it gives the same warp."""
    moving, fixed, _ = warped_pair
    weight = _inside(fraction=0.3).float()[None, None]
    kwargs = {'lam': 0.3, 'metric': 'lncc', 'levels': (4, 2), 'iterations': (20, 10),
              'weight': weight, 'margin_mm': 6}
    v_grid = optimise.optimise_svf(moving, fixed, GRID, **kwargs)
    v_box, to_grid = optimise.optimise_svf(moving, fixed, GRID, crop=True, **kwargs)
    assert all(n < m for n, m in zip(v_box.shape[2:], GRID.shape))
    assert np.array_equal(to_grid[:3, :3], np.eye(3)) and (to_grid[:3, 3] > 0).all()
    assert float(v_grid.abs().max()) > 0.1  # a real field
    torch.testing.assert_close(spatial.upsample_field(v_box, to_grid, GRID.shape), v_grid)
    disp = spatial.upsample_field(spatial.integrate_svf(v_box), to_grid, GRID.shape)
    torch.testing.assert_close(disp, spatial.integrate_svf(v_grid), atol=1e-3, rtol=0)


def test_svf_input_errors(warped_pair):
    moving, fixed, _ = warped_pair
    with pytest.raises(ValueError, match='grid'):
        optimise.optimise_svf(moving[..., :-1], fixed, GRID)
    with pytest.raises(ValueError, match='lam'):
        optimise.optimise_svf(moving, fixed, GRID, lam=1.5)
    with pytest.raises(ValueError, match='metric'):
        optimise.optimise_svf(moving, fixed, GRID, metric='mi', iterations=(1, 1))
    for factor in (0.5, (2.0, 2.0, 1.0)):
        with pytest.raises(ValueError, match='velocity_factor'):
            optimise.optimise_svf(moving, fixed, GRID, levels=(4, 2), iterations=(1, 1),
                                  velocity_factor=factor)


# --------------------------------------------------------------------------------------------
# Affine


def _head(shared_data, voxel=4.0):
    """sub-01's T1w head resampled to ``voxel`` mm (LIA grid over its FOV) and its brain mask."""
    img = load_image(shared_data / 'bids' / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz')
    lab = nb.load(
        shared_data
        / 'bids'
        / 'derivatives'
        / 'dlmuse'
        / 'sub-01'
        / 'anat'
        / 'sub-01_space-T1w_desc-dlmuse_dseg.nii.gz'
    )
    geom = Geometry.from_image(img)
    grid = optimise.iso_grid(*optimise._world_bbox(geom), voxel)
    vol = spatial.volume_tensor(img.get_fdata(dtype=np.float32))
    head = spatial.resample_linear(optimise.blur(vol, [0.4 * voxel / 2] * 3), geom, grid)
    brain = (
        spatial.resample_linear(
            spatial.volume_tensor((np.asarray(lab.dataobj) > 0).astype(np.float32)), geom, grid
        )[0, 0]
        > 0.5
    )
    return head, grid, brain


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(degrees)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _known_affine(centre, axis, degrees, shift, scale=1.0):
    m = np.eye(4)
    m[:3, :3] = _rotation(axis, degrees) * scale
    m[:3, 3] = centre - m[:3, :3] @ centre + np.asarray(shift, float)
    return m


def _mean_error(a, b, grid, mask):
    ijk = np.argwhere(np.asarray(mask))
    ras = ijk @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    pa = ras @ a[:3, :3].T + a[:3, 3]
    pb = ras @ b[:3, :3].T + b[:3, 3]
    return float(np.linalg.norm(pa - pb, axis=1).mean()), float(
        np.sqrt((np.linalg.norm(pa - pb, axis=1) ** 2).mean())
    )


def _moving(head, grid, truth):
    """The head pulled through inv(truth): registering it to ``head`` must give ``truth``."""
    return spatial.resample_linear(head, grid, grid, np.linalg.inv(truth))


def test_affine_recovers_known_affine(shared_data):
    head, grid, brain = _head(shared_data)
    centre = optimise._weighted_centre(grid, brain[None, None].float())
    truth = _known_affine(centre, (0.3, 1.0, 0.2), 15.0, (6.0, -5.0, 6.0), scale=1.04)
    moving = _moving(head, grid, truth)
    weight = masks.similarity_weight(head, grid, 'head')
    mweight = masks.similarity_weight(moving, grid, 'head')
    found = optimise.optimise_affine(
        moving, grid, head, grid, fixed_weight=weight, moving_weight=mweight, metric='lncc'
    )
    _, rms = _mean_error(found, truth, grid, masks.head_mask(head, grid) > 0)
    assert rms < 1.0


def test_rigid_keeps_rotation(shared_data):
    head, grid, brain = _head(shared_data)
    centre = optimise._weighted_centre(grid, brain[None, None].float())
    truth = _known_affine(centre, (1.0, 0.0, 0.0), 10.0, (0.0, 8.0, 0.0))
    moving = _moving(head, grid, truth)
    found = optimise.optimise_affine(
        moving,
        grid,
        head,
        grid,
        rigid=True,
        metric='lncc',
        fixed_weight=masks.similarity_weight(head, grid, 'head'),
    )
    assert np.allclose(found[:3, :3] @ found[:3, :3].T, np.eye(3), atol=1e-4)
    mean, _ = _mean_error(found, truth, grid, brain)
    assert mean < 1.0


def test_robust_init_recovers_large_motion(shared_data):
    head, grid, brain = _head(shared_data)
    centre = optimise._weighted_centre(grid, brain[None, None].float())
    truth = _known_affine(centre, (1.0, 0.4, -0.3), 45.0, (20.0, -15.0, 15.0))  # 29 mm
    moving = _moving(head, grid, truth)
    init = optimise.robust_affine_init(moving, grid, head, grid)
    found = optimise.optimise_affine(
        moving,
        grid,
        head,
        grid,
        init,
        metric='lncc',
        fixed_weight=masks.similarity_weight(head, grid),
        moving_weight=masks.similarity_weight(moving, grid),
    )
    mean, _ = _mean_error(found, truth, grid, brain)
    assert mean < 1.0


def test_robust_init_takes_candidates(shared_data):
    head, grid, brain = _head(shared_data, voxel=8.0)
    centre = optimise._weighted_centre(grid, brain[None, None].float())
    truth = _known_affine(centre, (0.0, 0.0, 1.0), 170.0, (0.0, 0.0, 0.0))  # beyond the search
    moving = _moving(head, grid, truth)
    near = _known_affine(centre, (0.0, 0.0, 1.0), 160.0, (0.0, 0.0, 0.0))
    found = optimise.robust_affine_init(
        moving, grid, head, grid, candidates=[near], max_angle=15.0
    )
    mean, _ = _mean_error(found, truth, grid, brain)
    assert mean < 4.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_matches_cpu(warped_pair):
    moving, fixed, true_v = warped_pair
    mask = _inside()
    kwargs = {'lam': 0.1, 'metric': 'lncc', 'levels': (4, 2), 'iterations': (30, 30)}
    cpu = optimise.optimise_svf(moving, fixed, GRID, **kwargs)
    gpu = optimise.optimise_svf(moving.cuda(), fixed.cuda(), GRID, **kwargs)
    assert gpu.device.type == 'cuda'
    assert abs(_error(gpu.cpu(), true_v, mask) - _error(cpu, true_v, mask)) < 0.05


def test_reduce_blocks_keeps_world_positions():
    """Block averages of a linear ramp equal the ramp at the reduced grid's voxel centres."""
    from synthmorph_app.engine.optimise import reduce_blocks

    aff = np.array([[-1.0, 0, 0, 90], [0, 0, 1.0, -100], [0, -1.0, 0, 110], [0, 0, 0, 1]])
    grid = Geometry((40, 36, 30), aff)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing='ij'), -1)
    ras = ijk @ aff[:3, :3].T + aff[:3, 3]
    ramp = ras @ np.array([0.5, -1.0, 2.0]) + 3.0
    reduced, rgrid = reduce_blocks(torch.as_tensor(ramp, dtype=torch.float32)[None, None],
                                   grid, 8.0)
    assert rgrid.shape == (10, 9, 8) and np.allclose(rgrid.voxel_sizes, 4.0)
    rijk = np.stack(np.meshgrid(*[np.arange(n) for n in rgrid.shape], indexing='ij'), -1)
    rras = rijk @ rgrid.affine[:3, :3].T + rgrid.affine[:3, 3]
    expected = rras @ np.array([0.5, -1.0, 2.0]) + 3.0
    inner = reduced[0, 0].numpy()[:, :, :7]  # the last z block is padded by replication
    assert np.allclose(inner, expected[:, :, :7], atol=1e-3)
    same, same_grid = reduce_blocks(reduced, rgrid, 4.0)  # nothing to reduce
    assert same is reduced and same_grid == rgrid


def test_blur_resize_is_blur_then_trilinear_resize():
    """The per-axis matrices give what the Gaussian (edge replicated) followed by trilinear
    resizing gives, on an anisotropic box, with an axis left unblurred and one not resized."""
    from synthmorph_app.engine.optimise import blur_matrix, blur_resize

    gen = torch.Generator().manual_seed(3)
    x = torch.rand(1, 2, 37, 9, 30, generator=gen)
    sigmas, shape = (2.1, 0.1, 0.9), (12, 9, 17)
    expected = F.interpolate(blur(x, sigmas), size=shape, mode='trilinear', align_corners=True)
    out = blur_resize(x, sigmas, shape)
    assert out.shape == (1, 2, *shape)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(blur_resize(x, sigmas, x.shape[2:]), blur(x, sigmas), atol=2e-6,
                               rtol=0)
    assert blur_resize(x, (0.0, 0.1, 0.0), x.shape[2:]) is x  # nothing to do
    m = blur_matrix(20, 1.5)
    torch.testing.assert_close(m.sum(1), torch.ones(20))  # rows keep a constant
    assert torch.equal(blur_matrix(5, 0.1), torch.eye(5))


def test_blur_is_the_separable_gaussian_with_replicated_edges():
    """Each axis convolved with the normalised Gaussian of ``ceil(3 sigma)`` taps a side, the
    edge voxel repeated beyond the volume; an axis under 0.2 voxel left alone."""
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 1, 13, 6, 9, generator=gen, dtype=torch.float64).float()
    sigmas = (1.3, 0.1, 0.7)
    expected = x.double().numpy()
    for axis, sigma in enumerate(sigmas):
        if sigma < 0.2:
            continue
        r = max(1, int(np.ceil(3 * sigma)))
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
        k /= k.sum()
        padded = np.pad(expected, [(0, 0)] * (2 + axis) + [(r, r)] + [(0, 0)] * (2 - axis),
                        mode='edge')
        n = expected.shape[2 + axis]
        expected = sum(w * np.take(padded, np.arange(j, j + n), axis=2 + axis)
                       for j, w in enumerate(k))
    np.testing.assert_allclose(blur(x, sigmas).numpy(), expected, atol=1e-6)
