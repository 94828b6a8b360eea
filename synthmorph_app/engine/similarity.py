"""Image similarities for test-time optimisation: local NCC and MIND-SSC.

Conventions
-----------
* Volumes are ``(B, C, X, Y, Z)`` float tensors on one grid; a *weight* is ``(B, 1, X, Y, Z)``
  (or broadcastable to it) and turns every mean over voxels into a weighted mean, so that voxels
  of zero weight (background, neck, eyes) do not count.
* Every similarity returned here is *higher for better* alignment; the optimisers minimise a
  dissimilarity derived from it.

Local NCC (:func:`lncc`)
    The *signed* squared local correlation ``cov * |cov| / (var_a * var_b)`` over cubic windows of
    ``2 * radius + 1`` voxels, averaged over voxels. It is 1 for identical images and -1 for an
    intensity-inverted copy, so it tells same-contrast pairs apart from inverted ones (the
    squared NCC of ``neurite.ncc``, ANTs and greedy is blind to the sign). We write it ourselves
    because ``ne.ncc`` is sign-blind, takes no weights and asserts on its range; the local sums use
    a separable box filter (:func:`box_sum`: shifted views added in place for small windows,
    cumulative sums for large ones). Measured on one shared CPU thread when it used cumulative
    sums only, forward and backward over the five moments of an 80x100x80 volume: 0.13 s against
    0.43 s for the separable average pooling of ``neurite.nn.functional.box_filter`` (5^3
    windows). The moments are summed one at a time, and a fixed image's two
    (:func:`window_stats`) once per level of an optimisation.

MIND-SSC (:func:`mind_ssc`)
    Modality-independent neighbourhood descriptors in their self-similarity-context form
    (Heinrich et al., MICCAI 2013): 12 channels of ``exp(-D / V)``, where ``D`` is the patch
    distance between the 12 pairs of voxels of the 6-neighbourhood at distance ``dilation``, and
    ``V`` their mean. They describe local structure, not intensity, so T1w, T2w, FLAIR and PDw
    give similar descriptors. :func:`mind_mse` (what the optimisers minimise) and
    :func:`mind_ncc` (what the benchmarks report) compare two sets of descriptors.

Choosing (:func:`choose_metric`)
    ``'auto'`` asks whether the intensities of the two images, roughly aligned, rise together
    inside the brain (:func:`contrast_agreement`): the voxels are split into dark, middle and
    bright thirds by one image, and the mean of the other must rise from third to third, both
    ways round, by more than :data:`AUTO_THRESHOLD` SDs. Then LNCC, else (in doubt) MIND.
    Measured after a rigid alignment, brain weight above 0.6, 2 mm: cross-subject T1w pairs
    0.35-0.6; PDw to T1w of one person -0.31 (MIND); FLAIR to T1w of one person 0.47-0.6 (these
    2 mm FLAIRs are T1-like in the brain: CSF dark, white matter brightest), but 0.11 for
    FLAIR to another person's T1w. As the deformable refinement judges it (8 mm, after the
    affine and the network's field; session 35): whole-head T1w pairs 0.54-1.06, T1w onto the
    T1w template -0.005 (an atrophied brain) to 0.75, skull-stripped T1w onto the stripped
    template -0.24 to 0.55, FLAIR to another person's T1w 0.04-0.87, PDw onto T1w -0.16, T1w
    onto T2w -0.97. A local NCC cannot make this choice: it was 0.2-0.6
    for every one of these pairs, PDw included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

#: Contrast agreement (SDs) above which ``'auto'`` picks LNCC rather than MIND. 0.25 until
#: session 35: skull-stripped 2 mm T1w onto the skull-stripped T1w template scored 0.13-0.25
#: (judged in the deep white matter of a stripped brain, where the thirds by intensity follow
#: the bias field more than the tissue) and got MIND, 0.013-0.034 Dice below LNCC; the
#: cross-contrast pairs score -0.16 (PDw onto T1w) to -0.97 (T1w onto T2w). Measured on every
#: pair that the change moves (benchmarks/README.md, "Session 35").
AUTO_THRESHOLD = 0.1
#: The same where the caller expects one contrast (``cross_contrast=False``, as the BIDS-App
#: says of a T1w onto its T1w templates): LNCC unless the intensities fall where they should
#: rise. An infant's T1w, grey and white matter swapped, scores below 0 and gets MIND: an
#: inverted copy of sub-01 scaled to 0.75 ended 71 mm off with LNCC, 1.2-1.6 mm with MIND.
SAME_CONTRAST_THRESHOLD = 0.0

#: The metrics the optimisers accept.
METRICS = ('auto', 'lncc', 'mind')


#: Largest window radius summed by shifted views rather than cumulative sums.
SHIFT_ADD_MAX_RADIUS = 4


def _radii(radius: int | Sequence[int]) -> tuple[int, int, int]:
    radii = (int(radius),) * 3 if isinstance(radius, (int, float)) else tuple(map(int, radius))
    if len(radii) != 3 or min(radii) < 0:
        raise ValueError(f'radius must be an int >= 0 or 3 of them, got {radius!r}')
    return radii


def box_sum(volume: torch.Tensor, radius: int | Sequence[int]) -> torch.Tensor:
    """Sum of ``volume`` (B, C, X, Y, Z) over cubic windows of ``2 * radius + 1`` voxels.

    Zero padding: windows that overlap the border sum fewer voxels. Separable, one axis at a
    time. Small windows (radius <= :data:`SHIFT_ADD_MAX_RADIUS`) add shifted views in place:
    exact in float32 (each sum holds a few numbers) and several times faster forward and
    backward on the CPU than cumulative sums, whose memory-bound float64 scans and flipped
    backward were the most expensive step of the optimiser. The box sum with zero padding is a
    symmetric linear map, so its backward pass is the same box sum of the gradient (no autograd
    graph of the views). Larger windows use a cumulative sum (float64: in float32 the running
    sums lose the small variances of smooth regions), whose cost does not grow with the window.
    """
    if volume.ndim != 5:
        raise ValueError(f'volume must be (B, C, X, Y, Z), got shape {tuple(volume.shape)}')
    radii = _radii(radius)
    if max(radii) <= SHIFT_ADD_MAX_RADIUS:
        return _BoxSum.apply(volume, radii)
    out = volume
    for axis, r in zip((2, 3, 4), radii):
        if r == 0:
            continue
        n = out.shape[axis]
        pad = [0] * 6
        pad[2 * (4 - axis)] = r + 1
        pad[2 * (4 - axis) + 1] = r
        csum = torch.cumsum(F.pad(out, pad), axis, dtype=torch.float64)
        out = (csum.narrow(axis, 2 * r + 1, n) - csum.narrow(axis, 0, n)).to(volume.dtype)
    return out


def _shift_add(volume: torch.Tensor, radii) -> torch.Tensor:
    """Separable zero-padded box sums by in-place adds of shifted views (no autograd)."""
    out = volume
    for axis, r in zip((2, 3, 4), radii):
        n = out.shape[axis]
        if r == 0 or n == 0:
            continue
        acc = out.clone()
        for shift in range(1, min(r, n - 1) + 1):
            acc.narrow(axis, shift, n - shift).add_(out.narrow(axis, 0, n - shift))
            acc.narrow(axis, 0, n - shift).add_(out.narrow(axis, shift, n - shift))
        out = acc
    return out


class _BoxSum(torch.autograd.Function):
    """Box sum whose backward is itself (the operator is symmetric)."""

    @staticmethod
    def forward(ctx, volume, radii):
        ctx.radii = radii
        return _shift_add(volume.detach(), radii)

    @staticmethod
    def backward(ctx, grad):
        return _BoxSum.apply(grad, ctx.radii), None


def box_count(shape, radius: int | Sequence[int], device=None, dtype=torch.float32):
    """Number of voxels inside a grid of ``shape`` in each window: ``(1, 1, X, Y, Z)``.

    Separable: the product of per-axis counts.
    """
    count = torch.ones((), dtype=dtype, device=device)
    for axis, r in zip(range(3), _radii(radius)):
        n = int(shape[axis])
        idx = torch.arange(n, device=device)
        c = (torch.clamp(idx + r, max=n - 1) - torch.clamp(idx - r, min=0) + 1).to(dtype)
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = n
        count = count * c.view(view)
    return count


def box_mean(volume: torch.Tensor, radius: int | Sequence[int]) -> torch.Tensor:
    """Mean of ``volume`` over cubic windows, counting only the voxels inside the volume."""
    count = box_count(volume.shape[2:], radius, volume.device, volume.dtype)
    return box_sum(volume, radius) / count


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` over everything, or weighted by ``weight`` (broadcast to values)."""
    if weight is None:
        return values.mean()
    weight = weight.expand_as(values)
    return (values * weight).sum() / weight.sum().clamp(min=1e-8)


def lncc_map(a: torch.Tensor, b: torch.Tensor, radius: int = 2, eps: float = 1e-3):
    """Voxelwise signed squared local correlation of ``a`` and ``b`` (B, C, X, Y, Z).

    ``cov * |cov| / (var_a * var_b)`` over windows of ``2 * radius + 1`` voxels; in [-1, 1].
    Flat windows, whose local variance in either image is below ``eps`` times that image's
    global variance (background; local SD under 3 % of the global one), give 0 and no
    gradient: a small constant added to the denominator instead (as voxelmorph does) makes
    flat background pull the field, and moved identical images by 1.4 mm in our tests.
    """
    if a.shape != b.shape:
        raise ValueError(f'images must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}')
    channels = a.shape[1]
    sums = box_sum(torch.cat([a, b, a * a, b * b, a * b], dim=1), radius)
    sa, sb, saa, sbb, sab = sums.split(channels, dim=1)
    # Windows at the border hold fewer voxels: statistics over the voxels inside only.
    inv_n = 1.0 / box_count(a.shape[2:], radius, a.device, a.dtype)
    cross = (sab - sa * sb * inv_n) * inv_n
    var_a = (saa - sa * sa * inv_n) * inv_n
    var_b = (sbb - sb * sb * inv_n) * inv_n
    with torch.no_grad():
        dims = tuple(range(2, a.ndim))
        flat_a = eps * a.var(dim=dims, keepdim=True).clamp(min=1e-30)
        flat_b = eps * b.var(dim=dims, keepdim=True).clamp(min=1e-30)
        valid = (var_a > flat_a) & (var_b > flat_b)
    denom = torch.where(valid, var_a * var_b, torch.ones_like(var_a))
    return torch.where(valid, cross * cross.abs() / denom, torch.zeros_like(cross))


class WindowStats(NamedTuple):
    """An image's means and variances over the windows of :func:`lncc`, and where it has
    texture (local variance above ``eps`` times its global variance; see :func:`lncc_map`)."""

    mean: torch.Tensor
    var: torch.Tensor
    textured: torch.Tensor


def window_stats(image: torch.Tensor, radius: int | Sequence[int] = 2,
                 eps: float = 1e-3) -> WindowStats:
    """:class:`WindowStats` of ``image`` (B, C, X, Y, Z), no gradient.

    For an image that stays fixed while the other moves (a registration's target): given to
    :func:`lncc` as ``b_stats``, they spare it two of its five window sums at every step.
    """
    radii = _radii(radius)
    with torch.no_grad():
        sb, sbb = box_sum(image, radii), box_sum(image * image, radii)
        inv_n = 1.0 / box_count(image.shape[2:], radii, image.device, image.dtype)
        mean = sb * inv_n
        var = sbb * inv_n - mean * mean
        flat = eps * image.var(dim=tuple(range(2, image.ndim)), keepdim=True).clamp(min=1e-30)
    return WindowStats(mean, var, var > flat)


def lncc(
    a: torch.Tensor,
    b: torch.Tensor,
    radius: int = 2,
    weight: torch.Tensor | None = None,
    eps: float = 1e-3,
    b_stats: WindowStats | None = None,
) -> torch.Tensor:
    """Mean signed squared local NCC of ``a`` and ``b`` (B, C, X, Y, Z); a scalar in [-1, 1].

    1 for identical images (where they are not flat), -1 for an intensity-inverted copy.
    ``weight`` (B, 1, X, Y, Z) weights the mean over voxels (no gradient flows to it).
    The same value as ``weighted_mean(lncc_map(a, b), weight)``, with an analytic gradient
    (:class:`_LNCC`): four box sums instead of autograd's graph, about twice as fast.
    ``b_stats`` (:func:`window_stats` of ``b`` with the same ``radius`` and ``eps``) spares the
    window sums of a fixed ``b``, which then gets no gradient.
    """
    if a.shape != b.shape:
        raise ValueError(f'images must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}')
    if weight is None:
        weight = torch.ones_like(a[:, :1])
    weight = weight.detach().expand_as(a)
    radii = _radii(radius)
    if b_stats is not None:
        if b.requires_grad:
            raise ValueError('b_stats are for a fixed b: b must not require a gradient')
        if b_stats.mean.shape != b.shape:
            raise ValueError(f'b_stats are of shape {tuple(b_stats.mean.shape)}, b of '
                             f'{tuple(b.shape)}')
    if max(radii) > SHIFT_ADD_MAX_RADIUS:
        return weighted_mean(lncc_map(a, b, radius, eps), weight)
    return _LNCC.apply(a, b, weight, radii, eps, b_stats)


class _LNCC(torch.autograd.Function):
    """Weighted mean of the signed squared local NCC with its analytic gradient.

    With window means ``A, B``, covariance ``c``, variances ``va, vb`` over ``n`` voxels and
    ``f = c |c| / (va vb)``, a voxel ``x`` of ``a`` enters every window ``W`` that holds it:
    ``df_W / da(x) = alpha_W (b(x) - B_W) - beta_W (a(x) - A_W)`` with
    ``alpha = 2 |c| / (va vb n)`` and ``beta = 2 f / (va n)``. Summing over windows is a box
    sum (the box operator is symmetric), so the gradient is
    ``b box(w alpha) - box(w alpha B) - a box(w beta) + box(w beta A)``, divided by the sum
    of the weights; likewise for ``b``. Flat windows (see :func:`lncc_map`) give 0 and no
    gradient.
    """

    @staticmethod
    def forward(ctx, a, b, weight, radii, eps, b_stats=None):
        with torch.no_grad():
            inv_n = 1.0 / box_count(a.shape[2:], radii, a.device, a.dtype)
            if b_stats is None:
                b_stats = window_stats(b, radii, eps)
            # one moment at a time: no concatenated copy, and each sum's working set stays
            # small (1.5-2 times faster than the five moments at once on 2 M voxels)
            sa, saa, sab = (box_sum(m, radii) for m in (a, a * a, a * b))
            mean_b = b_stats.mean
            mean_a = sa * inv_n
            cross = sab * inv_n - mean_a * mean_b
            var_a = saa * inv_n - mean_a * mean_a
            dims = tuple(range(2, a.ndim))
            flat_a = eps * a.var(dim=dims, keepdim=True).clamp(min=1e-30)
            valid = (var_a > flat_a) & b_stats.textured
            var_a = torch.where(valid, var_a, torch.ones_like(var_a))
            var_b = torch.where(valid, b_stats.var, torch.ones_like(var_a))
            value = torch.where(valid, cross * cross.abs() / (var_a * var_b),
                                torch.zeros_like(cross))
            total = weight.sum().clamp(min=1e-8)
            out = (value * weight).sum() / total
        ctx.save_for_backward(a, b, weight, mean_a, mean_b, cross, var_a, var_b, value, inv_n,
                              total)
        ctx.radii = radii
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b, weight, mean_a, mean_b, cross, var_a, var_b, value, inv_n, total = ctx.saved_tensors
        w = weight * (grad / total)
        alpha = w * 2 * cross.abs() / (var_a * var_b) * inv_n  # 0 where value is 0 (flat)
        alpha = torch.where(value != 0, alpha, torch.zeros_like(alpha))
        grads = []
        for this, other, mean_this, mean_other, var_this, needed in (
            (a, b, mean_a, mean_b, var_a, ctx.needs_input_grad[0]),
            (b, a, mean_b, mean_a, var_b, ctx.needs_input_grad[1]),
        ):
            if not needed:
                grads.append(None)
                continue
            beta = w * 2 * value / var_this * inv_n
            ba, bab, bb, bbm = (box_sum(m, ctx.radii)
                                for m in (alpha, alpha * mean_other, beta, beta * mean_this))
            grads.append(other * ba - bab - this * bb + bbm)
        return grads[0], grads[1], None, None, None, None


def shift_volume(volume: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
    """``out[x] = volume[x + offset]`` with edge replication (integer voxel offsets)."""
    pad = max(abs(int(o)) for o in offset)
    if pad == 0:
        return volume
    padded = F.pad(volume, [pad] * 6, mode='replicate')
    sx, sy, sz = (pad + int(o) for o in offset)
    X, Y, Z = volume.shape[2:]
    return padded[:, :, sx : sx + X, sy : sy + Y, sz : sz + Z]


# The 6-neighbourhood around the centre (1, 1, 1) and its 12 pairs at squared distance 2:
# the self-similarity context of MIND-SSC (Heinrich et al. 2013).
_SIX = ((0, 1, 1), (1, 1, 0), (1, 0, 1), (1, 1, 2), (2, 1, 1), (1, 2, 1))
_PAIRS = tuple(
    (i, j)
    for i in range(6)
    for j in range(i + 1, 6)
    if sum((p - q) ** 2 for p, q in zip(_SIX[i], _SIX[j])) == 2
)


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors (B, 12, X, Y, Z) of ``image`` (B, 1, X, Y, Z).

    ``dilation`` (voxels) is the distance of the neighbours from the centre, ``radius`` the patch
    radius of the distances. Each channel is ``exp(-D / V)`` normalised by its maximum over the
    channels (which is 1, see the code), so descriptors lie in (0, 1]. Written here (after
    Heinrich's public PyTorch code for ConvexAdam) because neither voxelmorph nor neurite has
    MIND. The channels of :func:`mind_ssc_channels`, concatenated.
    """
    return torch.cat(mind_ssc_channels(image, radius, dilation), dim=1)


def mind_ssc_channels(image: torch.Tensor, radius: int = 1,
                      dilation: int = 2) -> list[torch.Tensor]:
    """The 12 channels of :func:`mind_ssc` as separate (B, 1, X, Y, Z) tensors.

    What the optimisers use on large grids: twelve blocks of one channel each, rather than
    12-channel tensors of 90 MB on a 2 M-voxel level, stay below glibc's mmap threshold
    (:mod:`.allocator`) and in cache, forward and backward.
    """
    if image.ndim != 5 or image.shape[1] != 1:
        raise ValueError(f'image must be (B, 1, X, Y, Z), got shape {tuple(image.shape)}')
    offsets = [tuple((c - 1) * dilation for c in p) for p in _SIX]
    shifted = [shift_volume(image, o) for o in offsets]
    dists = [box_mean((shifted[i] - shifted[j]) ** 2, radius) for i, j in _PAIRS]
    low = dists[0]
    for d in dists[1:]:
        low = torch.minimum(low, d)
    dists = [d - low for d in dists]
    var = dists[0]
    for d in dists[1:]:
        var = var + d
    var = var / len(dists)
    mean_var = var.mean()
    var = var.clamp(min=mean_var * 1e-3, max=mean_var * 1e3)
    # The nearest channel has distance 0 after the shift above, so the maximum over channels
    # is exp(0) = 1 and dividing by it (the published normalisation) changes nothing: skipped.
    # One reciprocal of the single-channel variance and a product are cheaper, forward and
    # backward, than dividing 12 channels.
    scale = -1.0 / var
    return [torch.exp(d * scale) for d in dists]


def mind_sq_diff(a, b) -> torch.Tensor:
    """Voxelwise mean over channels of the squared difference of two descriptor sets (B, 1,
    X, Y, Z): each a (B, 12, X, Y, Z) tensor or a list of channels (:func:`mind_ssc_channels`).
    """
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return ((a - b) ** 2).mean(dim=1, keepdim=True)
    a = list(a.split(1, dim=1)) if isinstance(a, torch.Tensor) else list(a)
    b = list(b.split(1, dim=1)) if isinstance(b, torch.Tensor) else list(b)
    if len(a) != len(b):
        raise ValueError(f'descriptors of {len(a)} and {len(b)} channels')
    total = (a[0] - b[0]) ** 2
    for x, y in zip(a[1:], b[1:]):
        total = total + (x - y) ** 2
    return total / len(a)


def mind_mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of two MIND descriptor sets (B, 12, X, Y, Z); 0 is best.

    ``weight`` (B, 1, X, Y, Z) weights the mean over voxels (channels are averaged).
    """
    if a.shape != b.shape:
        raise ValueError(
            f'descriptors must have one shape, got {tuple(a.shape)}, {tuple(b.shape)}'
        )
    return weighted_mean(mind_sq_diff(a, b), weight)


def mind_ncc(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """NCC of two MIND descriptor sets (B, 12, X, Y, Z), averaged over channels; 1 is best.

    Each channel's (weighted) Pearson correlation over the voxels, then the mean over channels:
    the cross-contrast similarity our benchmarks report.
    """
    if a.shape != b.shape:
        raise ValueError(
            f'descriptors must have one shape, got {tuple(a.shape)}, {tuple(b.shape)}'
        )
    dims = (0, 2, 3, 4)
    if weight is None:
        weight = torch.ones_like(a[:, :1])
    w = weight.expand_as(a)
    total = w.sum(dim=dims).clamp(min=1e-8)
    ma = (w * a).sum(dim=dims) / total
    mb = (w * b).sum(dim=dims) / total
    da = a - ma.view(1, -1, 1, 1, 1)
    db = b - mb.view(1, -1, 1, 1, 1)
    cov = (w * da * db).sum(dim=dims)
    var = ((w * da * da).sum(dim=dims) * (w * db * db).sum(dim=dims)).clamp(min=1e-12)
    return (cov / var.sqrt()).mean()


def _tertile_steps(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Steps (in SDs of ``a``) between the means of ``a`` over the dark, middle and bright
    thirds of ``b``."""
    step = max(1, b.numel() // 200_000)
    cuts = torch.quantile(b[::step], torch.tensor([1 / 3, 2 / 3], dtype=b.dtype, device=b.device))
    dark = a[b < cuts[0]].mean()
    middle = a[(b >= cuts[0]) & (b < cuts[1])].mean()
    bright = a[b >= cuts[1]].mean()
    sd = a.std().clamp(min=1e-8)
    return float((middle - dark) / sd), float((bright - middle) / sd)


def contrast_agreement(
    moving: torch.Tensor, fixed: torch.Tensor, weight: torch.Tensor | None = None
) -> float:
    """How surely two roughly aligned images share one contrast: > 0 when intensities rise
    together.

    Within the voxels where ``weight`` exceeds half its maximum (all voxels without one), the
    voxels are split into thirds by one image's intensity; the mean of the other image must rise
    from each third to the next. Returns the smallest rise, in SDs, over both directions
    (``nan`` with fewer than 100 voxels).
    """
    if moving.shape != fixed.shape:
        raise ValueError(
            f'images must have one shape, got {tuple(moving.shape)} and {tuple(fixed.shape)}'
        )
    sel = torch.ones_like(fixed, dtype=torch.bool)
    if weight is not None:
        weight = weight.expand_as(fixed)
        sel = weight > 0.5 * weight.max()
    a, b = moving[sel].float(), fixed[sel].float()
    if a.numel() < 100:
        return float('nan')
    return min(*_tertile_steps(a, b), *_tertile_steps(b, a))


def auto_threshold(cross_contrast: bool | None) -> float:
    """The contrast agreement above which ``'auto'`` picks LNCC: :data:`SAME_CONTRAST_THRESHOLD`
    where the images are said to share a contrast (``False``), else :data:`AUTO_THRESHOLD`."""
    return SAME_CONTRAST_THRESHOLD if cross_contrast is False else AUTO_THRESHOLD


def choose_metric(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    weight: torch.Tensor | None = None,
    threshold: float = AUTO_THRESHOLD,
) -> str:
    """``'lncc'`` for a same-contrast pair, ``'mind'`` otherwise (or when in doubt).

    ``moving`` and ``fixed`` (1, 1, X, Y, Z) must lie on one grid, roughly aligned (after an
    affine or a moments initialisation). LNCC when :func:`contrast_agreement` exceeds
    ``threshold``, else MIND: see the module docstring.
    """
    with torch.no_grad():
        score = contrast_agreement(moving, fixed, weight)
    return 'lncc' if score > threshold else 'mind'
