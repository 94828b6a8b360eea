"""Networks: shapes, input checks, fits (gradcheck), symmetry properties of the untrained models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synthmorph_app.engine.networks import (
    AffineDecomposer,
    AffineDetector,
    AffineEncoder,
    HyperUNet,
    build_model,
    default_config,
    model_kind,
    symmetric_velocity,
)
from synthmorph_app.engine.networks.fit import (
    barycenters,
    centred_to_voxel,
    decompose_rigid,
    fit_affine,
    fit_rigid,
    matrix_exp,
    matrix_log,
    matrix_sqrt,
    symmetrize,
)

GEN = torch.Generator().manual_seed(1234)
EYE = torch.eye(4)

# small networks that run in well under a second at 32^3
SMALL = {
    'detector': {'arch': 'AffineDetector', 'enc': [4, 8, 8], 'add': [8], 'num_features': 16},
    'detector_rigid': {
        'arch': 'AffineDetector', 'enc': [4, 8, 8], 'add': [8], 'num_features': 16, 'rigid': True,
    },
    'detector_official': {
        'arch': 'AffineDetector', 'enc': [4, 8, 8], 'add': [8], 'num_features': 16,
        'downsample': 'subsample', 'symmetrize': 'mean', 'rigid': True,
        'rigid_method': 'decompose', 'ridge': 0.0,
    },
    'encoder': {'arch': 'AffineEncoder', 'enc': [4, 8, 8]},
    'encoder_rigid': {'arch': 'AffineEncoder', 'enc': [4, 8, 8], 'rigid': True},
    'encoder_grid': {'arch': 'AffineEncoder', 'enc': [4, 8, 8], 'pool_grid': 2},
    'decomposer': {'arch': 'AffineDecomposer', 'enc': [4, 8, 8], 'dec': [8, 8], 'add': [4]},
    'decomposer_cost': {
        'arch': 'AffineDecomposer', 'enc': [4, 8, 8], 'dec': [8, 8], 'add': [4], 'cost_volume': 1,
    },
    'decomposer_rigid': {
        'arch': 'AffineDecomposer', 'enc': [4, 8, 8], 'dec': [8, 8], 'add': [4], 'rigid': True,
    },
}  # fmt: skip
HYPER = {
    'arch': 'HyperUNet',
    'enc': [4, 8, 8],
    'dec': [8, 8, 4],
    'add': [4],
    'hyper_units': [8, 8],
}


def blobs(shape=(32, 32, 32), n=6, seed=0, shift=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """A (1, 1, X, Y, Z) image in [0, 1]: a sum of Gaussian blobs, optionally shifted (voxels)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing='ij'), -1)
    img = np.zeros(shape)
    for _ in range(n):
        centre = rng.uniform(0.25, 0.75, 3) * np.array(shape) + np.array(shift)
        width = rng.uniform(0.06, 0.15) * min(shape)
        img += rng.uniform(0.3, 1) * np.exp(-((grid - centre) ** 2).sum(-1) / (2 * width**2))
    img /= img.max()
    return torch.as_tensor(img, dtype=torch.float32)[None, None]


def random_affine(batch=1, scale=0.1, dtype=torch.float64) -> torch.Tensor:
    lin = torch.eye(3, dtype=dtype) + scale * torch.randn(batch, 3, 3, generator=GEN, dtype=dtype)
    shift = 5 * torch.randn(batch, 3, generator=GEN, dtype=dtype)
    out = torch.eye(4, dtype=dtype).repeat(batch, 1, 1)
    out[:, :3, :3] = lin
    out[:, :3, 3] = shift
    return out


def random_rotation(batch=1, dtype=torch.float64) -> torch.Tensor:
    w = torch.randn(batch, 3, generator=GEN, dtype=dtype)
    skew = torch.zeros(batch, 3, 3, dtype=dtype)
    skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -w[:, 2], w[:, 1], -w[:, 0]
    skew = skew - skew.transpose(1, 2)
    return torch.linalg.matrix_exp(skew)


def apply(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return points @ matrix[:, :3, :3].transpose(1, 2) + matrix[:, None, :3, 3]


# ------------------------------------------------------------------------------- fits


def test_fit_affine_recovers_known_affine():
    x = 20 * torch.randn(2, 10, 3, generator=GEN, dtype=torch.float64)
    truth = random_affine(2)
    w = torch.rand(2, 10, generator=GEN, dtype=torch.float64)
    fit = fit_affine(x, apply(truth, x), w)
    torch.testing.assert_close(fit, truth, atol=1e-9, rtol=0)
    # ridge barely moves a well-determined fit
    fit = fit_affine(x, apply(truth, x), w, ridge=1e-3)
    torch.testing.assert_close(fit, truth, atol=1e-3, rtol=0)


def test_fit_affine_degenerate_is_identity_with_ridge():
    x = torch.zeros(1, 5, 3, dtype=torch.float64)
    w = torch.zeros(1, 5, dtype=torch.float64)
    torch.testing.assert_close(fit_affine(x, x + 1, w, ridge=1e-3), torch.eye(4)[None].double())


def test_fit_rigid_recovers_rotation_and_is_symmetric():
    x = 20 * torch.randn(3, 12, 3, generator=GEN, dtype=torch.float64)
    truth = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1)
    truth[:, :3, :3] = random_rotation(3)
    truth[:, :3, 3] = torch.randn(3, 3, generator=GEN, dtype=torch.float64)
    w = torch.rand(3, 12, generator=GEN, dtype=torch.float64)
    y = apply(truth, x)
    torch.testing.assert_close(fit_rigid(x, y, w), truth, atol=1e-9, rtol=0)
    # noisy points: the backward fit is exactly the inverse of the forward fit
    y = y + torch.randn(y.shape, generator=GEN, dtype=torch.float64)
    fwd, bwd = fit_rigid(x, y, w), fit_rigid(y, x, w)
    torch.testing.assert_close(fwd @ bwd, torch.eye(4, dtype=torch.float64).expand(3, 4, 4))
    rot = fwd[:, :3, :3]
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64)
                               .expand(3, 3, 3))  # fmt: skip
    assert torch.allclose(torch.linalg.det(rot), torch.ones(3, dtype=torch.float64))


def test_fit_rigid_never_reflects():
    x = 10 * torch.randn(1, 8, 3, generator=GEN, dtype=torch.float64)
    mirrored = x * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    rot = fit_rigid(x, mirrored, torch.ones(1, 8, dtype=torch.float64))[:, :3, :3]
    assert torch.linalg.det(rot).item() == pytest.approx(1.0)


def test_gradcheck_fits():
    x = 3 * torch.randn(1, 6, 3, generator=GEN, dtype=torch.float64)
    y = apply(random_affine(1), x) + 0.1 * torch.randn(1, 6, 3, generator=GEN, dtype=torch.float64)
    w = torch.rand(1, 6, generator=GEN, dtype=torch.float64) + 0.1
    args = (x.requires_grad_(), y.requires_grad_(), w.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b, c: fit_affine(a, b, c, ridge=1e-2), args)
    assert torch.autograd.gradcheck(fit_rigid, args)


def test_gradcheck_symmetrize_log():
    a = random_affine(1, scale=0.05).requires_grad_()
    b = random_affine(1, scale=0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, q: symmetrize(p, q, 'log'), (a, b))


def test_matrix_functions():
    a = random_affine(3, scale=0.3)
    torch.testing.assert_close(matrix_exp(matrix_log(a)), a)
    root = matrix_sqrt(a)
    torch.testing.assert_close(root @ root, a)
    assert torch.all(matrix_log(a)[:, 3] == 0)
    assert torch.all(matrix_log(torch.eye(4)[None]) == 0)


def test_symmetrize_modes():
    a, b = random_affine(2), random_affine(2)
    for mode in ('log', 'mean'):
        # consistent fits give back the fit
        torch.testing.assert_close(symmetrize(a, torch.linalg.inv(a), mode), a)
    # log mode: swapping the images inverts the result exactly
    product = symmetrize(a, b, 'log') @ symmetrize(b, a, 'log')
    torch.testing.assert_close(product, torch.eye(4, dtype=torch.float64).expand(2, 4, 4))
    with pytest.raises(ValueError, match='symmetrize'):
        symmetrize(a, b, 'median')


def test_decompose_rigid_keeps_rotation_and_shift():
    rot = random_rotation(2)
    upper = torch.tensor([[1.1, 0.1, -0.05], [0, 0.9, 0.08], [0, 0, 1.05]], dtype=torch.float64)
    mat = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    mat[:, :3, :3] = rot @ upper
    mat[:, :3, 3] = torch.tensor([3.0, -2.0, 7.0], dtype=torch.float64)
    out = decompose_rigid(mat)
    torch.testing.assert_close(out[:, :3, :3], rot)
    torch.testing.assert_close(out[:, :3, 3], mat[:, :3, 3])


def test_barycenters_and_centred_frame():
    feat = torch.zeros(1, 2, 4, 4, 4)
    feat[0, 0, 3, 0, 1] = 2.0  # one hot voxel
    cen, mass = barycenters(feat, (16, 16, 16))
    # feature voxel i of 4 covers full voxels 4i..4i+3 (centre 4i + 1.5); the centred frame's
    # origin is full voxel 7.5
    torch.testing.assert_close(cen[0, 0], torch.tensor([13.5, 1.5, 5.5]) - 7.5)
    assert cen[0, 1].abs().sum() == 0 and mass[0, 1] == 0  # empty channel: divide-no-nan
    shift = torch.eye(4)[None].clone()
    shift[0, :3, 3] = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(centred_to_voxel(shift, (16, 16, 16)), shift)
    scale = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))[None]
    vox = centred_to_voxel(scale, (16, 16, 16))
    centre = torch.tensor([7.5, 7.5, 7.5, 1.0])
    torch.testing.assert_close(vox[0] @ centre, centre)


# ------------------------------------------------------------------------------ models


@pytest.mark.parametrize('name', sorted(SMALL))
def test_affine_models_shapes_config_identity(name):
    model = build_model(SMALL[name]).eval()
    assert json.loads(json.dumps(model.config)) == model.config
    rebuilt = build_model(model.config)
    assert rebuilt.config == model.config
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    moving, fixed = blobs(seed=1), blobs(seed=2)
    with torch.no_grad():
        out = model(torch.cat((moving, fixed)), torch.cat((fixed, moving)))
        same = model(moving, moving)
    assert out.shape == (2, 4, 4) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 3], EYE[3].expand(2, 4))
    # identical inputs: the identity, by symmetry of construction
    torch.testing.assert_close(same[0], EYE, atol=1e-4, rtol=0)
    if model.config['rigid']:
        rot = out[:, :3, :3].double()
        torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3).double().expand(2, 3, 3),
                                   atol=1e-5, rtol=0)  # fmt: skip
        torch.testing.assert_close(
            torch.linalg.det(rot), torch.ones(2).double(), atol=1e-5, rtol=0
        )
    if model.config.get('symmetrize', 'log') == 'log':
        # inverse-consistent: (m, f) and (f, m) give inverse matrices
        torch.testing.assert_close(out[0] @ out[1], EYE, atol=1e-4, rtol=0)


def test_detector_untrained_output_is_a_sane_affine():
    model = AffineDetector(enc=[4, 8, 8], add=[8], num_features=16).eval()
    with torch.no_grad():
        out = model(blobs(seed=3), blobs(seed=3, shift=(2, 0, 0)))
    assert torch.linalg.det(out[0, :3, :3]) > 0


@pytest.mark.parametrize('name', ['detector', 'encoder', 'decomposer'])
def test_affine_models_backpropagate(name):
    model = build_model(SMALL[name])
    out = model(blobs(seed=4), blobs(seed=5))
    (out[:, :3] - EYE[:3]).square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_encoder_pool_grid_keeps_the_layout_and_old_configs():
    # earlier models pooled globally and wrote no pool_grid: they build as they were
    old = build_model({'arch': 'AffineEncoder', 'enc': [4, 8, 8]})
    assert 'pool_grid' not in old.config and old.head.in_features == 8
    grid = build_model({'arch': 'AffineEncoder', 'enc': [4, 8, 8], 'pool_grid': 2})
    assert grid.config['pool_grid'] == 2 and grid.head.in_features == 8 * 2**3
    # the head reads each cell apart: a weight on one cell sees a blob there and not elsewhere
    with torch.no_grad():
        grid.head.weight.zero_()
        grid.head.weight[9, ::8] = 1.0  # cell (0, 0, 0) of every channel -> the x shift
        core = torch.zeros(1, 8, 4, 4, 4)
        core[..., :2, :2, :2] = 1.0
        assert grid.head(grid.pool(core).flatten(1))[0, 9] == 8.0
        assert grid.head(grid.pool(core.flip(2, 3, 4)).flatten(1))[0, 9] == 0.0
        # the global average cannot tell the two apart
        assert torch.equal(old.pool(core), old.pool(core.flip(2, 3, 4)))
    with pytest.raises(ValueError, match='pool_grid'):
        AffineEncoder(pool_grid=0)


def test_affine_input_errors():
    model = AffineDetector(enc=[4, 8], add=[], num_features=8)
    assert model.multiple == 8
    good = torch.zeros(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match='divisible by 8'):
        model(torch.zeros(1, 1, 16, 16, 12), torch.zeros(1, 1, 16, 16, 12))
    with pytest.raises(ValueError, match=r'moving must be \(B, 1, X, Y, Z\)'):
        model(torch.zeros(1, 2, 16, 16, 16), good)
    with pytest.raises(ValueError, match='same shape'):
        model(good, torch.zeros(1, 1, 16, 16, 24))
    with pytest.raises(ValueError, match='fixed must be'):
        model(good, torch.zeros(16, 16, 16))
    with pytest.raises(ValueError, match='rigid_method'):
        AffineDetector(rigid_method='svd')
    with pytest.raises(ValueError, match='downsample'):
        AffineEncoder(downsample='max')
    with pytest.raises(ValueError, match='unknown architecture'):
        build_model({'arch': 'Nope'})
    with pytest.raises(ValueError, match="'arch'"):
        build_model({'enc': [1]})


def test_hyper_unet_untrained_small_and_lambda_dependent():
    model = build_model(HYPER).eval()
    assert model_kind(model.config) == 'deform'
    moving, fixed = blobs(seed=6), blobs(seed=7)
    with torch.no_grad():
        v1 = model(moving, fixed, torch.tensor([[0.2]]))
        v2 = model(moving, fixed, torch.tensor([[0.9]]))
        v_float = model(moving, fixed, 0.2)
    assert v1.shape == (1, 3, 16, 16, 16)
    assert torch.isfinite(v1).all() and v1.abs().max() < 0.01
    assert v1.abs().max() > 0
    assert not torch.allclose(v1, v2, rtol=1e-3, atol=0)
    torch.testing.assert_close(v_float, v1)


def test_hyper_unet_batch_with_different_lambdas():
    model = build_model({**HYPER, 'final_init_std': 1.0}).eval()
    moving = torch.cat((blobs(seed=8), blobs(seed=9)))
    fixed = torch.cat((blobs(seed=10), blobs(seed=11)))
    lam = torch.tensor([[0.1], [0.7]])
    with torch.no_grad():
        both = model(moving, fixed, lam)
        one = model(moving[1:], fixed[1:], lam[1:])
        same = model(moving, fixed, torch.tensor([[0.7], [0.7]]))
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(same[1:], one, atol=1e-5, rtol=1e-4)


def test_symmetric_velocity_is_antisymmetric():
    model = build_model({**HYPER, 'final_init_std': 1.0}).eval()
    moving, fixed = blobs(seed=12), blobs(seed=13)
    with torch.no_grad():
        v = symmetric_velocity(model, moving, fixed, 0.5)
        w = symmetric_velocity(model, fixed, moving, torch.tensor([[0.5]]))
        raw = model(moving, fixed, 0.5)
    assert v.shape == raw.shape
    torch.testing.assert_close(v, -w)
    assert not torch.allclose(v, raw)


def test_hyper_unet_backpropagates_and_errors():
    model = build_model(HYPER)
    lam = torch.tensor([[0.3]])
    model(blobs(seed=14), blobs(seed=15), lam).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.flow.kernel_map.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        model(blobs(), blobs(), 1.5)
    with pytest.raises(ValueError, match=r'lam must be \(1, 1\)'):
        model(blobs(), blobs(), torch.zeros(2, 1))
    with pytest.raises(ValueError, match='divisible by 16'):
        model(torch.zeros(1, 1, 24, 32, 32), torch.zeros(1, 1, 24, 32, 32), lam)
    with pytest.raises(ValueError, match='target must be'):
        model(blobs(), torch.zeros(1, 32, 32, 32), lam)
    with pytest.raises(ValueError, match='decoder'):
        HyperUNet(enc=[4, 4], dec=[4])
    half = model.half_to_full()
    assert half[0, 0] == 2 and half[0, 3] == 0.5
    assert HyperUNet(downsample='subsample').half_to_full()[0, 3] == 0


def test_cost_volume_points_to_the_shift_for_any_contrast():
    """The MIND cost volume of a pair whose target is its source shifted by ``o`` (half-grid
    voxels) peaks at ``o`` inside the image, also when the target's contrast is inverted."""
    model = build_model({**HYPER, 'cost_volume': 1})
    assert model.config['cost_volume'] == 1 and 'cost_volume' not in build_model(HYPER).config
    assert build_model(model.config).config == model.config
    assert model.core.enc[0].in_channels == 2 + 27
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand((1, 1, 24, 24, 24), generator=gen)
    source = F.avg_pool3d(F.pad(noise, [1] * 6, mode='replicate'), 3, stride=1)  # texture
    inner = (slice(None), slice(None), *[slice(4, -4)] * 3)
    for offset in [(1, 0, 0), (0, -1, 1), (0, 0, 0)]:
        target = torch.roll(source, [-o for o in offset], dims=(2, 3, 4))  # t(x) = s(x + o)
        for image in (target, 1 - target):
            cost = model.cost(torch.cat((source, image), 1))
            assert cost.shape == (1, 27, 24, 24, 24)
            best = cost.argmax(1)[inner[:1] + inner[2:]]
            expected = model.offsets.index(offset)
            assert (best == expected).float().mean() > 0.9, offset
    with pytest.raises(ValueError, match='cost_volume'):
        HyperUNet(cost_volume=-1)


def test_hyper_unet_with_a_cost_volume_runs_and_backpropagates():
    model = build_model({**HYPER, 'cost_volume': 1, 'final_init_std': 1.0})
    lam = torch.tensor([[0.3]])
    v = model(blobs(seed=14), blobs(seed=15, shift=(2.0, 0.0, 0.0)), lam)
    assert v.shape == (1, 3, 16, 16, 16) and torch.isfinite(v).all()
    v.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        w = symmetric_velocity(model, blobs(seed=15), blobs(seed=14), 0.3)
        u = symmetric_velocity(model, blobs(seed=14), blobs(seed=15), 0.3)
    torch.testing.assert_close(w, -u)


@pytest.mark.parametrize('kind', ['affine', 'rigid', 'deform'])
def test_default_configs(kind):
    cfg = default_config(kind)
    assert model_kind(cfg) == kind
    model = build_model(cfg)
    assert model.multiple <= 32  # 128^3 and 160^3 grids work
    if kind == 'deform':  # the network that learns on CPU (docs/model_cards.md)
        assert cfg['cost_volume'] == 1
    assert isinstance(model, (AffineDetector, HyperUNet, AffineDecomposer, AffineEncoder))


@pytest.mark.parametrize('activation, steered', [(None, True), ('relu', False)])
def test_default_hypernetwork_still_hears_lambda_when_its_last_units_are_negative(
        activation, steered):
    """The trained ReLU hypernetwork ended with every last-layer unit negative for lambda >= 0.5:
    its output was zero there, lambda no longer steered the network, and no gradient reached
    the units. The default (leaky ReLU) keeps lambda's signal and its gradient."""
    cfg = default_config('deform')
    if activation:
        cfg['hyper_activation'] = activation
    torch.manual_seed(0)
    mlp = build_model(cfg).hyper
    with torch.no_grad():
        mlp[-2].bias.fill_(-10.0)  # every unit of the last layer below zero
    lam = torch.tensor([[0.6], [0.9]], requires_grad=True)
    out = mlp(lam)
    out.sum().backward()
    assert (not torch.equal(out[0], out[1])) is steered
    assert bool(lam.grad.abs().sum() > 0) is steered


@pytest.mark.parametrize('init, keeps', [('he', True), ('torch', False)])
def test_hidden_init_keeps_the_input_signal_through_the_unet(init, keeps):
    """He's initialisation keeps the input-dependent part of the U-Net's features; the default
    ``nn.Conv3d`` start shrinks it layer after layer (the untrained network is nearly blind)."""
    torch.manual_seed(0)
    model = build_model({'arch': 'HyperUNet', 'hidden_init': init}).eval()
    assert model.config['hidden_init'] == init
    gen = torch.Generator().manual_seed(1)
    images = [F.avg_pool3d(torch.rand(1, 1, 64, 64, 64, generator=gen), 3, 1, 1)
              for _ in range(2)]
    with torch.no_grad():
        h = model.hyper(torch.full((1, 1), 0.5))
        x = torch.cat(images, 1)[:, :, ::2, ::2, ::2]
        first = F.leaky_relu(model.core.enc[0](x, h), 0.2)
        last = model.core(x, h)
    ratio = float(last.std(dim=(2, 3, 4)).mean() / first.std(dim=(2, 3, 4)).mean())
    assert (ratio > 0.5) is keeps, ratio
    with pytest.raises(ValueError, match='init'):
        build_model({'arch': 'HyperUNet', 'hidden_init': 'xavier'})


@pytest.mark.parametrize('init, keeps', [('he', True), ('torch', False)])
def test_detector_init_keeps_the_spatial_signal_of_its_features(init, keeps):
    """Feature maps that vary across the image (not a constant bias) give distinct barycentres."""
    torch.manual_seed(0)
    model = build_model({'arch': 'AffineDetector', 'init': init}).eval()
    gen = torch.Generator().manual_seed(1)
    image = F.avg_pool3d(torch.rand(1, 1, 64, 64, 64, generator=gen), 3, 1, 1)
    with torch.no_grad():
        x = model.core.enc[0](image[:, :, ::2, ::2, ::2])
        feat = model.head(model.core(image[:, :, ::2, ::2, ::2]))
    ratio = float(feat.std(dim=(2, 3, 4)).mean() / x.std(dim=(2, 3, 4)).mean())
    assert (ratio > 0.5) is keeps, ratio
    with pytest.raises(ValueError, match='init'):
        build_model({'arch': 'AffineDetector', 'init': 'xavier'})
