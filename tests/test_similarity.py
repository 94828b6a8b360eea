"""Tests of the similarities: box sums, local NCC, MIND-SSC and the automatic choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synthmorph_app.engine import similarity
from synthmorph_app.engine.optimise import blur

GEN = torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """One thread: these small volumes run faster without threading on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _phantom(shape=(24, 28, 20)) -> torch.Tensor:
    """A smooth random image with structure everywhere (no flat windows)."""
    noise = torch.rand(1, 1, *shape, generator=GEN)
    return blur(noise, (1.5, 1.5, 1.5)) * 4 + 0.05 * torch.rand(1, 1, *shape, generator=GEN)


def test_box_sum_matches_convolution():
    x = torch.rand(2, 3, 9, 10, 11, generator=GEN, dtype=torch.float64)
    ref = F.conv3d(
        x.reshape(6, 1, 9, 10, 11), torch.ones(1, 1, 5, 3, 7, dtype=x.dtype), padding=(2, 1, 3)
    ).reshape_as(x)
    assert torch.allclose(similarity.box_sum(x, (2, 1, 3)), ref, atol=1e-10)


def test_box_mean_counts_only_inside():
    x = torch.ones(1, 1, 5, 6, 7)
    assert torch.allclose(similarity.box_mean(x, 2), x)


def test_lncc_self_and_inverted():
    x = _phantom()
    assert float(similarity.lncc(x, x)) == pytest.approx(1.0, abs=1e-3)
    inverted = x.max() - x
    assert float(similarity.lncc(x, inverted)) < -0.99
    other = _phantom()
    assert abs(float(similarity.lncc(x, other))) < 0.3


def test_lncc_weight_selects_voxels():
    x = _phantom()
    y = x.clone()
    y[..., 10:] = torch.rand_like(y[..., 10:])
    weight = torch.zeros_like(x)
    weight[..., :6] = 1
    assert float(similarity.lncc(x, y, weight=weight)) == pytest.approx(1.0, abs=1e-3)
    assert float(similarity.lncc(x, y)) < 0.8


def test_mind_is_contrast_blind():
    x = _phantom()
    mx = similarity.mind_ssc(x)
    assert mx.shape == (1, 12, *x.shape[2:])
    assert float(mx.min()) > 0 and float(mx.max()) <= 1 + 1e-6
    mi = similarity.mind_ssc(3 - 2 * x)  # inverted, rescaled contrast
    assert float(similarity.mind_ncc(mx, mi)) > 0.99
    assert float(similarity.mind_mse(mx, mi)) < 1e-6
    other = similarity.mind_ssc(_phantom())
    assert float(similarity.mind_ncc(mx, other)) < 0.5


def test_mind_channels_and_their_squared_difference_match_the_descriptor_tensor():
    """The channel list the optimisers use is :func:`mind_ssc` split, and
    :func:`mind_sq_diff` gives one map for tensors, lists or a mix."""
    x, y = _phantom(), _phantom()
    channels = similarity.mind_ssc_channels(x, 1, 2)
    assert len(channels) == 12 and all(c.shape == (1, 1, *x.shape[2:]) for c in channels)
    tensor = similarity.mind_ssc(x, 1, 2)
    assert torch.equal(torch.cat(channels, 1), tensor)
    other = similarity.mind_ssc(y, 1, 2)
    plain = ((tensor - other) ** 2).mean(dim=1, keepdim=True)
    for a, b in ((tensor, other), (channels, other), (channels, list(other.split(1, 1)))):
        assert torch.allclose(similarity.mind_sq_diff(a, b), plain, atol=1e-7)
    with pytest.raises(ValueError, match='12 and 11'):
        similarity.mind_sq_diff(channels, channels[:11])


def test_choose_metric():
    x = _phantom()
    assert similarity.choose_metric(x + 0.01 * torch.rand_like(x), x) == 'lncc'
    assert similarity.choose_metric(x.max() - x, x) == 'mind'


def test_one_contrast_lowers_the_bar_but_not_below_inversion():
    """Said to share a contrast (``cross_contrast=False``, a T1w onto a T1w template), a pair
    whose intensities rise together only weakly keeps LNCC; an inverted pair (an infant's T1w)
    still gets MIND. Unsaid (None), the usual bar holds."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(rng.normal(size=(40, 40, 40)), 2)
    x = torch.as_tensor((x - x.min()) / (x.max() - x.min()), dtype=torch.float32)[None, None]
    weak = x + torch.as_tensor(rng.normal(0, 2.0, x.shape), dtype=torch.float32)
    agreement = similarity.contrast_agreement(weak, x)
    assert similarity.SAME_CONTRAST_THRESHOLD < agreement < similarity.AUTO_THRESHOLD
    assert similarity.contrast_agreement(1 - x, x) < similarity.SAME_CONTRAST_THRESHOLD
    for told, weak_metric in ((None, 'mind'), (True, 'mind'), (False, 'lncc')):
        threshold = similarity.auto_threshold(told)
        assert similarity.choose_metric(weak, x, threshold=threshold) == weak_metric
        assert similarity.choose_metric(1 - x, x, threshold=threshold) == 'mind'
        assert similarity.choose_metric(x, x, threshold=threshold) == 'lncc'


def test_shape_errors():
    x = _phantom()
    with pytest.raises(ValueError, match='shape'):
        similarity.lncc(x, x[..., :-1])
    with pytest.raises(ValueError, match='B, 1, X, Y, Z'):
        similarity.mind_ssc(x[0])
    with pytest.raises(ValueError, match='radius'):
        similarity.box_sum(x, (1, 2))


def test_fast_box_sum_and_lncc_gradient_match_the_plain_ones(monkeypatch):
    """Shifted-view box sums and the analytic LNCC gradient equal the cumulative-sum box sums
    and autograd through ``lncc_map`` (float64, to rounding)."""
    from scipy.ndimage import gaussian_filter

    import synthmorph_app.engine.similarity as S

    rng = np.random.default_rng(5)
    a0 = torch.tensor(gaussian_filter(rng.random((14, 12, 13)), 1.5)[None, None])
    b0 = 0.5 * a0 + torch.tensor(gaussian_filter(rng.random((14, 12, 13)), 1.5)[None, None])
    weight = torch.tensor(rng.random((1, 1, 14, 12, 13)))
    fast = S.box_sum(a0, (2, 1, 3))
    assert torch.autograd.gradcheck(lambda v: S.box_sum(v, (2, 1, 3)),
                                    (a0.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda x, y: S.lncc(x, y, 2, weight),
                                    (a0.clone().requires_grad_(), b0.clone().requires_grad_()))
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    S.lncc(a, b, 2, weight).backward()
    monkeypatch.setattr(S, 'SHIFT_ADD_MAX_RADIUS', 0)  # the cumulative-sum path
    assert torch.allclose(S.box_sum(a0, (2, 1, 3)), fast, atol=1e-12)
    a2, b2 = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    S.weighted_mean(S.lncc_map(a2, b2, 2), weight).backward()
    assert torch.allclose(a.grad, a2.grad, atol=1e-10) and torch.allclose(b.grad, b2.grad,
                                                                          atol=1e-10)


def test_lncc_with_precomputed_fixed_statistics_is_the_same():
    """``b_stats`` of a fixed ``b`` give the same value and gradient for ``a``, flat windows
    included, and refuse a ``b`` that wants a gradient or has another shape."""
    import synthmorph_app.engine.similarity as S

    rng = np.random.default_rng(7)
    a0 = torch.tensor(rng.random((1, 1, 12, 11, 13)))
    b = torch.tensor(rng.random((1, 1, 12, 11, 13)))
    b[..., :5] = 0.25  # a flat slab: windows there count 0, with or without the statistics
    weight = torch.tensor(rng.random((1, 1, 12, 11, 13)))
    stats = S.window_stats(b, 2)
    assert not stats.textured[..., :2].any() and stats.textured[..., -3:].all()
    grads = []
    for kwargs in ({}, {'b_stats': stats}):
        a = a0.clone().requires_grad_()
        value = S.lncc(a, b, 2, weight, **kwargs)
        value.backward()
        grads.append((value.detach(), a.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: S.lncc(x, b, 2, weight, b_stats=stats),
                                    (a0.clone().requires_grad_(),))
    with pytest.raises(ValueError, match='fixed b'):
        S.lncc(a0, b.clone().requires_grad_(), 2, b_stats=stats)
    with pytest.raises(ValueError, match='b_stats are of shape'):
        S.lncc(a0[..., :-1], b[..., :-1], 2, b_stats=stats)
