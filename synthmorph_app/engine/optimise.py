"""Test-time (instance) optimisation: affine/rigid and diffeomorphic deformable registration.

Plain PyTorch; the device follows the input tensors (CPU or CUDA), float32 throughout.

Affine and rigid (:func:`optimise_affine`, :func:`robust_affine_init`)
    Work in world space. At each level of ``levels`` (mm), both images are blurred and
    resampled to isotropic LIA grids of that spacing: the fixed one over the bounding box of
    ``fixed_weight`` (or its whole field of view), the moving one over its whole field of view.
    Each step pulls the moving working image through the current 4x4 RAS matrix (fixed RAS to
    moving RAS) onto the fixed working grid and scores the weighted similarity; voxels that
    map outside the moving field of view do not count. Parameters: a translation (mm), a
    rotation vector, log-scales and shears about the centre of the fixed weight, each scaled so
    that one unit moves the head surface by about 1 mm; rigid keeps translation and rotation.

Deformable (:func:`optimise_svf`)
    Both images on one grid. A stationary velocity field (SVF) in voxel units of that grid,
    exponentiated by scaling and squaring (``spatial.integrate_svf``, voxelmorph's
    ``integrate_vec``); the inverse is ``exp(-v)``. Coarse to fine over ``levels`` (the image
    spacings, mm; default 8, 4, 2 here, 8, 4, 2, 1.5 in ``register``). Measured choices
    (cross-subject T1w pairs at 2 mm, one CPU thread, ``benchmarks/refine_bench.py``):

    * The field lives in the bounding box of ``weight`` plus ``margin_mm``, over which it tapers
      to zero, and the similarity is computed inside the weight's box only: neck, shoulders
      and the rest of a large field of view cost nothing (the 2 mm level of a 106x127x135
      whole-head grid shrinks to about 90x108x72 voxels).
    * At each level the field is held at ``velocity_factor`` (2) times the image spacing, as
      SynthMorph's half-resolution SVF, and its displacement is sampled at the image voxels.
      ``register`` lowers the factor at the finest level for inputs finer than 2 mm
      (``register.FIELD_SPACING_PER_INPUT_VOXEL``).
      Integrating and backpropagating at full resolution cost 4 s per step at 2 mm.
    * The gradient skips the squarings (``exact_gradient=False``): ``d exp(v) / dv`` is taken
      as the identity (first order, as in log-domain demons). The exact gradient made a pair
      about 1.4 times slower and gave the same Dice (0.724 against 0.725, mean of 3 pairs).
    * ``symmetric=False`` by default: warping both images into the mid-space (``exp(+-v/2)``)
      doubled the cost of a step and gave lower Dice (0.626 against 0.637 on sub-01 to
      sub-02). The inverse is ``exp(-v)`` either way.

Loss and lambda
    ``loss = (1 - lam) * dissimilarity + lam * SMOOTHNESS_SCALE * smoothness``: ``lam`` in
    [0, 1] as the hypernetwork's lambda, 0 sharpest, 1 smoothest (1 returns a zero field, as
    the loss then holds no image term). The dissimilarity is ``1 - lncc`` (signed squared local
    NCC, window 5 voxels) or ``MIND_SCALE * mind_mse`` (MIND-SSC, recomputed on the warped
    image each step); the smoothness is the mean squared Jacobian of the velocity in mm per mm
    (the same at every level and voxel size). With :data:`SMOOTHNESS_SCALE` = 1, lambda 0.3,
    0.5 and 0.7 gave mean Dice 0.632, 0.636 and 0.611 on two pairs, with SD of the log
    Jacobian 0.55, 0.36 and 0.22 and no folding in the brain at 0.5 (0.001 % at 0.3).

Across contrasts (``cross_contrast``)
    Where the two images differ in contrast, the similarity's optimum is not the anatomy's: a
    FLAIR's periventricular caps and a different grey-white contrast pull the field by 4-6 mm
    in the deep white matter of one person's own T1w. The refinement then runs at the raised
    lambda :func:`cross_contrast_lambda` (0.5 acts as 0.7), a smoothness weighed
    :data:`CROSS_CONTRAST_FACTOR` times more against the similarity. ``None`` (the default)
    decides from the metric: MIND (chosen, or picked by ``'auto'``) means different contrasts.
    Measured (``benchmarks/README.md``, "Session 12: a smoother refinement across
    contrasts"): FLAIR to another person's T1w, 12 pairs, and bert T1 to the T2w template
    gain, and the same person's FLAIR to its T1w loses less to the deformable step.

Optimiser
    Adam written out here (:class:`Adam`): ``torch.optim.Adam``'s first step imports
    ``torch._dynamo`` (about 2-3 s on these CPUs), more than a coarse level costs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..io.images import Geometry
from . import masks, spatial
from .similarity import (
    METRICS,
    auto_threshold,
    choose_metric,
    contrast_agreement,
    lncc,
    lncc_map,
    mind_sq_diff,
    mind_ssc,
    mind_ssc_channels,
    weighted_mean,
    window_stats,
)

log = logging.getLogger('synthmorph_app.engine.optimise')

#: Weight of the smoothness term at lambda = 1 relative to the dissimilarity (calibrated).
SMOOTHNESS_SCALE = 1.0
#: Factor on the MIND mean squared difference so its range matches 1 - LNCC's.
MIND_SCALE = 10.0
#: Distance (mm) of the MIND-SSC neighbours from the centre, in whole voxels of each level (at
#: least 1). 2 mm rather than 4 mm: sub-chris PDw -> T1w joint MIND-NCC in the brain 0.505 ->
#: 0.533 (affine alone 0.516, greedy 0.508), where the coarser descriptors let the deformable
#: step lower it below the affine's; cross-subject T1w pairs registered with MIND (3 pairs)
#: mean Dice 0.642 -> 0.636. Only the 2 mm levels change (coarser ones use 1 voxel either way).
MIND_DILATION_MM = 2.0
#: Adam's epsilon for the SVF, in loss units per field voxel (loss summed over field voxels):
#: gradients far below it (numerical noise, identical images) move the field by far less than
#: the learning rate, where plain Adam would step by the full rate in every voxel.
ADAM_EPS = 0.3
#: Local NCC window radius (voxels of each level).
LNCC_RADIUS = 2
#: How many times more the smoothness weighs against the similarity across contrasts
#: (:func:`cross_contrast_lambda`): lambda 0.5 acts as 0.7.
CROSS_CONTRAST_FACTOR = 7.0 / 3.0
#: Default spacing of the optimised velocity field as a multiple of each level's image spacing:
#: SynthMorph's half-resolution SVF.
VELOCITY_FACTOR = 2.0
#: Scaling-and-squaring steps of the field inside the optimisation loop (at most ``steps``). The
#: field lives on a grid of twice each level's spacing and moves a few of its voxels, so
#: ``v / 32`` is already a small fraction of a voxel: 5 rather than 7 steps took 7 % off a 2 mm
#: T1w pair and moved no benchmark figure by more than 0.002 (12 T1w pairs 0.6813 against
#: 0.6810; benchmarks/README.md, "Session 37"). The returned velocity is integrated as the
#: caller chooses (``register``: 7 steps).
LOOP_STEPS = 5
#: The weight above which voxels belong to the deformable refinement's box (``optimise_svf``).
ROI_THRESHOLD = 0.01


# --------------------------------------------------------------------------------------------
# Small tools


class Adam:
    """Adam (Kingma & Ba) over a list of tensors; no ``torch._dynamo`` import on the first step.

    ``step(lr)`` takes the learning rate of this step, so schedules need no scheduler object.
    """

    def __init__(self, params: Sequence[torch.Tensor], betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.betas = betas
        self.eps = eps
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, lr: float | Sequence[float]) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1 = 1 - b1**self.t
        c2 = 1 - b2**self.t
        lrs = lr if isinstance(lr, (list, tuple)) else [lr] * len(self.params)
        for p, m, v, rate in zip(self.params, self.m, self.v, lrs):
            if p.grad is None:
                continue
            g = p.grad
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-rate / c1)
            p.grad = None


def cross_contrast_lambda(lam: float, factor: float = CROSS_CONTRAST_FACTOR) -> float:
    """The lambda whose smoothness-to-similarity ratio is ``factor`` times that of ``lam``
    (0 and 1 stay): ``lam' / (1 - lam') = factor * lam / (1 - lam)``."""
    lam = float(lam)
    if lam >= 1.0:
        return 1.0
    return factor * lam / (factor * lam + 1.0 - lam)


def _lr_schedule(base: float, it: int, total: int, final: float = 0.1) -> float:
    """Cosine decay from ``base`` to ``final * base``."""
    frac = it / max(total - 1, 1)
    return base * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * frac)))


def _volume(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[:2] != (1, 1):
        shape = tuple(x.shape) if hasattr(x, 'shape') else type(x).__name__
        raise ValueError(f'{name} must be a (1, 1, X, Y, Z) tensor, got {shape}')
    return x.to(torch.float32)


def _weight_tensor(weight, shape, device, name) -> torch.Tensor | None:
    if weight is None:
        return None
    w = spatial.as_tensor(weight, device)
    if w.ndim == 3:
        w = w[None, None]
    if tuple(w.shape[2:]) != tuple(shape) or w.ndim != 5:
        raise ValueError(f'{name} must have the shape {tuple(shape)}, got {tuple(w.shape)}')
    return w


def _gaussian_1d(sigma: float, device) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur(volume: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, X, Y, Z) with per-axis SDs in voxels (edge replicated).

    Each axis is a weighted sum of shifted views of the padded volume, accumulated in place:
    ``F.conv3d`` with a one-axis kernel went through an unfolded copy of the volume per tap on
    the CPU (a 256^3 volume and a 7-tap kernel: 1.2 GB more peak memory and 1.8 s, against a
    few copies and a fraction of the time here).
    """
    out = volume
    for axis, sigma in enumerate(sigmas):
        if sigma < 0.2:
            continue
        taps = _gaussian_1d(float(sigma), 'cpu').tolist()
        r = (len(taps) - 1) // 2
        n = out.shape[2 + axis]
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        padded = F.pad(out, pad, mode='replicate')
        acc = padded.narrow(2 + axis, 0, n) * taps[0]
        for j in range(1, len(taps)):
            acc.add_(padded.narrow(2 + axis, j, n), alpha=taps[j])
        out = acc
    return out


def blur_matrix(n: int, sigma: float, device=None) -> torch.Tensor:
    """The ``(n, n)`` matrix of :func:`blur` along one axis of ``n`` voxels (edge replicated;
    the identity below a sigma of 0.2 voxel, where :func:`blur` leaves the axis alone)."""
    if sigma < 0.2:
        return torch.eye(n, device=device)
    k = _gaussian_1d(float(sigma), 'cpu').double()
    r = (k.numel() - 1) // 2
    rows = torch.arange(n).view(-1, 1)
    cols = (rows + torch.arange(-r, r + 1).view(1, -1)).clamp(0, n - 1)
    out = torch.zeros(n, n, dtype=torch.float64)
    out.scatter_add_(1, cols, k.view(1, -1).expand(n, -1).contiguous())
    return out.to(device, torch.float32)


def blur_resize(volume: torch.Tensor, sigmas: Sequence[float], shape) -> torch.Tensor:
    """``_resize(blur(volume, sigmas), shape)`` as one matrix per axis
    (:func:`.spatial.resize_separable`): the Gaussian and the trilinear resizing
    (``align_corners``) of an axis are one ``(m, n)`` matrix. For the coarse levels of a
    1.5 mm box (144 x 132 x 164 voxels, one CPU thread) this took a few hundredths of a
    second against 0.15 s a volume for the blur alone, whose kernels grow with the level.
    """
    n_in = tuple(volume.shape[2:])
    if tuple(shape) == n_in and all(s < 0.2 for s in sigmas):
        return volume
    matrices = [
        spatial.interpolation_matrix(n, m, device=volume.device) @ blur_matrix(
            n, float(s), volume.device)
        for n, m, s in zip(n_in, shape, sigmas)
    ]
    return spatial.resize_separable(volume, matrices)


def _antialias_sigmas(source_vox, target_mm: float):
    """Blur (source voxels) before resampling from ``source_vox`` spacing to ``target_mm``."""
    return [0.4 * math.sqrt(max(target_mm**2 - v**2, 0.0)) / v for v in source_vox]


def _normalise(volume: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Scale intensities so the 99th percentile of the (weighted) head is 1; clip at 0 and 2."""
    flat = volume.reshape(-1)
    if weight is not None:
        sel = flat[weight.reshape(-1) > 0.05]
        flat = sel if sel.numel() > 100 else flat
    else:
        sel = flat[flat > 0]
        flat = sel if sel.numel() > 100 else flat
    step = max(1, flat.numel() // 200_000)
    hi = torch.quantile(flat[::step], 0.99).clamp(min=1e-6)
    return (volume / hi).clamp(0, 2)


def _world_bbox(geometry: Geometry, mask: np.ndarray | None = None):
    """RAS bounding box (min, max) of a grid's voxels (or of the voxels where ``mask``)."""
    if mask is None:
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in geometry.shape], indexing='ij'))
        ijk = corners.reshape(3, -1).T
    else:  # from the mask's projections on each axis: no index array the size of the mask
        spans = [np.flatnonzero(mask.any(axis=tuple(d for d in range(3) if d != axis)))
                 for axis in range(3)]
        lo, hi = [s[0] for s in spans], [s[-1] for s in spans]
        corners = np.array(np.meshgrid(*[[a, b] for a, b in zip(lo, hi)], indexing='ij'))
        ijk = corners.reshape(3, -1).T
    ras = ijk @ geometry.affine[:3, :3].T + geometry.affine[:3, 3]
    return ras.min(0), ras.max(0)


def iso_grid(lo: np.ndarray, hi: np.ndarray, voxel: float, margin: float = 0.0) -> Geometry:
    """An isotropic LIA grid of ``voxel`` mm covering the RAS box [lo, hi] plus ``margin``."""
    lo = np.asarray(lo, float) - margin
    hi = np.asarray(hi, float) + margin
    extent = hi - lo
    # LIA voxel axes run along R(-), S(-), A(+): extents (x: R, y: S, z: A).
    shape = tuple(math.ceil(e / voxel) + 1 for e in (extent[0], extent[2], extent[1]))
    return spatial.network_grid(
        Geometry((1, 1, 1), np.eye(4)), voxel_size=voxel, shape=shape, center=(lo + hi) / 2
    )


def _to_grid(volume, source: Geometry, target: Geometry, voxel: float, mode='linear'):
    """Blur ``volume`` for ``voxel`` mm and resample it from ``source`` onto ``target``.

    Fine inputs are first reduced by block averages (:func:`reduce_blocks`), so the Gaussian
    runs on a few voxels: blurring a 1 mm 256^3 head for an 8 mm level took 3.5 s on one
    thread, the reduced one a few hundredths.
    """
    volume, source = reduce_blocks(volume, source, voxel)
    sig = _antialias_sigmas(source.voxel_sizes, voxel)
    return spatial.resample_linear(blur(volume, sig), source, target, mode=mode)


def reduce_blocks(volume: torch.Tensor, grid: Geometry, voxel: float):
    """Average blocks of ``k`` voxels per axis, with ``k`` voxels no wider than ``voxel / 2``.

    Returns the reduced (B, C, ...) volume and its grid (voxel centres at the blocks'
    centres). The far edges are padded by replication to whole blocks. A box of ``k`` voxels
    blurs by an SD of about ``k / sqrt(12)`` voxels, well under the anti-aliasing blur of the
    ``voxel`` level that follows, which :func:`_antialias_sigmas` computes on the reduced grid.
    """
    factors = [max(1, int(voxel / (2 * v))) for v in grid.voxel_sizes]
    factors = [f if f <= n else 1 for f, n in zip(factors, grid.shape)]
    if all(f == 1 for f in factors):
        return volume, grid
    pad = []
    for f, n in zip(reversed(factors), reversed(grid.shape)):
        pad += [0, (-n) % f]
    if any(pad):
        volume = F.pad(volume, pad, mode='replicate')
    reduced = F.avg_pool3d(volume, kernel_size=factors, stride=factors)
    scale = np.diag([*factors, 1.0]).astype(float)
    scale[:3, 3] = [(f - 1) / 2 for f in factors]
    return reduced, Geometry(tuple(reduced.shape[2:]), grid.affine @ scale)


# --------------------------------------------------------------------------------------------
# Dissimilarities


class _Dissimilarity:
    """``1 - lncc`` or ``MIND_SCALE * mind_mse`` on features prepared once per level."""

    def __init__(self, metric: str, voxel: float):
        if metric not in ('lncc', 'mind'):
            raise ValueError(f"metric must be 'lncc' or 'mind' here, got {metric!r}")
        self.metric = metric
        self.dilation = max(1, round(MIND_DILATION_MM / voxel))

    def features(self, image: torch.Tensor, split: bool = False):
        """The image (LNCC) or its MIND-SSC descriptors: one tensor, or with ``split`` a list
        of one-channel tensors (:func:`.similarity.mind_ssc_channels`; for large grids)."""
        if self.metric == 'mind':
            if split:
                return mind_ssc_channels(image, radius=1, dilation=self.dilation)
            return mind_ssc(image, radius=1, dilation=self.dilation)
        return image

    def map(self, moved, fixed) -> torch.Tensor:
        """Voxelwise dissimilarity (B, 1, X, Y, Z)."""
        if self.metric == 'mind':
            return MIND_SCALE * mind_sq_diff(moved, fixed)
        return 1 - lncc_map(moved, fixed, LNCC_RADIUS)

    def fixed_stats(self, fixed: torch.Tensor):
        """What :meth:`__call__` may reuse of a fixed target over many steps (LNCC: its
        window statistics; None for MIND)."""
        return window_stats(fixed, LNCC_RADIUS) if self.metric == 'lncc' else None

    def __call__(self, moved, fixed, weight=None, fixed_stats=None) -> torch.Tensor:
        if self.metric == 'lncc':  # the fused value and analytic gradient
            return 1 - lncc(moved, fixed, LNCC_RADIUS, weight, b_stats=fixed_stats)
        return weighted_mean(self.map(moved, fixed), weight)


def _resolve_metric(metric: str, moving: torch.Tensor, fixed: torch.Tensor, weight,
                    cross_contrast: bool | None = None) -> str:
    if metric not in METRICS:
        raise ValueError(f'metric must be one of {METRICS}, got {metric!r}')
    if metric != 'auto':
        return metric
    chosen = choose_metric(moving, fixed, weight, threshold=auto_threshold(cross_contrast))
    log.info('metric auto: chose %s', chosen)
    return chosen


# --------------------------------------------------------------------------------------------
# Affine


def _rotation(vec: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of a rotation vector (axis * angle in radians), via the matrix exp."""
    zero = torch.zeros((), dtype=vec.dtype, device=vec.device)
    skew = torch.stack(
        [
            torch.stack([zero, -vec[2], vec[1]]),
            torch.stack([vec[2], zero, -vec[0]]),
            torch.stack([-vec[1], vec[0], zero]),
        ]
    )
    return torch.linalg.matrix_exp(skew)


def _param_matrix(p: torch.Tensor, centre: torch.Tensor, radius: float) -> torch.Tensor:
    """4x4 matrix from 12 parameters (translation mm, rotation, log-scale, shear), about centre.

    Rotation, scale and shear parameters are divided by ``radius`` (mm), so one unit of any
    parameter moves points at that distance from the centre by about 1 mm.
    """
    t, r, s, h = p[0:3], p[3:6] / radius, p[6:9] / radius, p[9:12] / radius
    one = torch.ones((), dtype=p.dtype, device=p.device)
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    shear = torch.stack(
        [
            torch.stack([one, h[0], h[1]]),
            torch.stack([zero, one, h[2]]),
            torch.stack([zero, zero, one]),
        ]
    )
    lin = _rotation(r) @ torch.diag(torch.exp(s)) @ shear
    trans = centre + t - lin @ centre
    top = torch.cat([lin, trans[:, None]], dim=1)
    return torch.cat([top, torch.tensor([[0.0, 0, 0, 1]], dtype=p.dtype, device=p.device)])


class _AffineLevel:
    """Working images of one level and the batched scoring of world matrices."""

    def __init__(
        self, moving, moving_grid, fixed, fixed_grid, voxel, fixed_weight, moving_weight, fixed_box
    ):
        self.voxel = voxel
        device = fixed.device
        self.fgrid = iso_grid(*fixed_box, voxel, margin=2 * voxel)
        self.mgrid = iso_grid(*_world_bbox(moving_grid), voxel, margin=voxel)
        self.fixed = _to_grid(fixed, fixed_grid, self.fgrid, voxel)
        self.moving = _to_grid(moving, moving_grid, self.mgrid, voxel)
        self.fweight = (
            spatial.resample_linear(fixed_weight, fixed_grid, self.fgrid)
            if fixed_weight is not None
            else None
        )
        self.fixed = _normalise(self.fixed, self.fweight)
        ones = torch.ones_like(moving)
        self.inside = spatial.resample_linear(ones, moving_grid, self.mgrid)
        mw = moving_weight if moving_weight is not None else torch.ones_like(moving)
        self.mweight = spatial.resample_linear(mw, moving_grid, self.mgrid) * self.inside
        self.moving = _normalise(self.moving, self.mweight)
        # the most two images can share (both grids have the level's voxel size)
        fixed_total = (float(self.fweight.sum()) if self.fweight is not None
                       else float(np.prod(self.fgrid.shape)))
        self.total = max(min(fixed_total, float(self.mweight.sum())), 1e-6)
        self.fix_aff = spatial.as_tensor(self.fgrid.affine, device)
        self.mov_inv = spatial.as_tensor(np.linalg.inv(self.mgrid.affine), device)
        self.ident = spatial.identity_coords(self.fgrid.shape, device).reshape(3, -1)
        self.metric = None
        self.dissim = None

    def resolve_metric(self, metric: str, matrices, cross_contrast: bool | None = None) -> str:
        """``metric``, or for ``'auto'`` the choice of :func:`.similarity.choose_metric` at the
        best of a few world matrices (fixed RAS -> moving RAS).

        Each is judged where both weights overlap after it (the moved moving weight, inside
        its field of view, times the fixed weight), so a slab or a cut field of view does not
        count its empty surroundings as a contrast mismatch; the pair gets LNCC when one of them
        shows a shared contrast. A same-contrast pair agrees where it is aligned, a
        cross-contrast pair nowhere. ``cross_contrast`` False (one contrast expected) lowers
        the bar (:func:`.similarity.auto_threshold`).
        """
        if metric not in METRICS:
            raise ValueError(f'metric must be one of {METRICS}, got {metric!r}')
        if metric != 'auto':
            return metric
        device = self.fixed.device
        scores = []
        with torch.no_grad():
            for matrix in matrices:
                m = spatial.as_tensor(np.asarray(matrix, dtype=float), device)[None]
                moved = self.sample(m, torch.cat([self.moving, self.mweight], dim=1))
                weight = moved[:, 1:] if self.fweight is None else moved[:, 1:] * self.fweight
                scores.append(contrast_agreement(moved[:, :1], self.fixed, weight))
        best = max((v for v in scores if not math.isnan(v)), default=float('nan'))
        chosen = 'lncc' if best > auto_threshold(cross_contrast) else 'mind'
        log.info('metric auto: chose %s (contrast agreement %s)', chosen,
                 ' / '.join(f'{v:.2f}' for v in scores))
        return chosen

    def set_metric(self, metric):
        self.metric = metric
        self.dissim = _Dissimilarity(metric, self.voxel)
        self.ffeat = self.dissim.features(self.fixed)

    def sample(self, matrices: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
        """Pull ``volume`` (1, C, ...) on the moving grid through world matrices (N, 4, 4)."""
        vox = self.mov_inv @ matrices @ self.fix_aff
        coords = vox[:, :3, :3] @ self.ident + vox[:, :3, 3:]
        coords = coords.reshape(-1, 3, *self.fgrid.shape)
        return spatial.sample_grid(volume.expand(len(matrices), *volume.shape[1:]), coords)

    def loss(self, matrices: torch.Tensor, overlap: bool = False):
        """Dissimilarity (N,) of each world matrix (fixed RAS -> moving RAS).

        With ``overlap``, also the share (N,) of the smaller weight that the two weights hold
        in common after each matrix: the dissimilarity of a matrix that leaves the images apart
        is a mean over nothing and says nothing.
        """
        moved = self.sample(matrices, torch.cat([self.moving, self.mweight], dim=1))
        # MIND of the moved image, not moved MIND: descriptors are not rotation invariant.
        feat, w = self.dissim.features(moved[:, :1]), moved[:, 1:].detach()
        if self.fweight is not None:
            w = w * self.fweight
        values = self.dissim.map(feat, self.ffeat.expand(len(matrices), *self.ffeat.shape[1:]))
        dims = (1, 2, 3, 4)
        shared = w.sum(dims)
        score = (values * w).sum(dims) / shared.clamp(min=1e-6)
        return (score, shared / self.total) if overlap else score


def _fixed_box(fixed_grid, fixed_weight):
    if fixed_weight is None:
        return _world_bbox(fixed_grid)
    mask = fixed_weight[0, 0].detach().cpu().numpy() > 0.01
    if not mask.any():
        raise ValueError('fixed_weight is zero everywhere')
    return _world_bbox(fixed_grid, mask)


def _weighted_centre(grid: Geometry, weight: torch.Tensor | None) -> np.ndarray:
    if weight is None:
        return spatial.fov_center(grid)
    w = weight[0, 0].detach()
    # from the three marginal sums: one axis summed in float32 (a few hundred values), the rest
    # in double. Exact enough, and no index array; ``sum(dtype=float64)`` would copy the
    # whole image to double first (about 60 ms a call at 256^3, nine calls a registration).
    xy, xz = w.sum(2).double(), w.sum(1).double()
    sums = [xy.sum(1), xy.sum(0), xz.sum(0)]
    total = max(float(sums[0].sum()), 1e-9)
    ijk = [float((m * torch.arange(len(m), dtype=m.dtype, device=m.device)).sum()) / total
           for m in sums]
    return grid.affine[:3, :3] @ np.asarray(ijk) + grid.affine[:3, 3]


def _run_affine(
    level: _AffineLevel, init: np.ndarray, centre, rigid, iterations, lr, verbose=False
):
    device = level.fixed.device
    nparam = 6 if rigid else 12
    p = torch.zeros(12, device=device)
    free = p[:nparam].clone().requires_grad_()
    a0 = spatial.as_tensor(init, device)
    c = spatial.as_tensor(centre, device)
    opt = Adam([free])
    radius = 60.0

    def matrix(q):
        full = torch.cat([q, p[nparam:]]) if nparam < 12 else q
        return a0 @ _param_matrix(full, c, radius)

    first = None
    for it in range(iterations):
        loss = level.loss(matrix(free)[None])[0]
        if first is None:
            first = float(loss.detach())
        loss.backward()
        opt.step(_lr_schedule(lr, it, iterations))
    with torch.no_grad():
        final = matrix(free)
        last = float(level.loss(final[None])[0])
    if verbose:
        log.info(
            'affine level %g mm (%s): dissimilarity %.4f -> %.4f in %d iterations',
            level.voxel,
            level.metric,
            first if first is not None else last,
            last,
            iterations,
        )
    return final.double().cpu().numpy(), last


def _moments_init(moving_grid, moving_weight, fixed_grid, fixed_weight) -> np.ndarray:
    """Translation that maps the fixed weight's centre of mass onto the moving one's."""
    init = np.eye(4)
    init[:3, 3] = _weighted_centre(moving_grid, moving_weight) - _weighted_centre(
        fixed_grid, fixed_weight
    )
    return init


def optimise_affine(
    moving: torch.Tensor,
    moving_grid: Geometry,
    fixed: torch.Tensor,
    fixed_grid: Geometry,
    init: np.ndarray | None = None,
    *,
    rigid: bool = False,
    metric: str = 'auto',
    levels: Sequence[float] = (8.0, 4.0),
    iterations: Sequence[int] = (60, 40),
    fixed_weight=None,
    moving_weight=None,
    lr: float | None = None,
    verbose: bool = False,
    generator: torch.Generator | None = None,
    cross_contrast: bool | None = None,
) -> np.ndarray:
    """Affine (12 DOF) or rigid (6 DOF) registration in world space, coarse to fine.

    Parameters
    ----------
    moving, fixed
        ``(1, 1, X, Y, Z)`` tensors on their own grids (any orientation and voxel size).
    moving_grid, fixed_grid
        Their :class:`Geometry`.
    init
        4x4 RAS matrix (fixed RAS -> moving RAS) to start from; None: the translation that
        matches the weights' centres of mass (the FOV centres without weights).
    rigid
        Rotation and translation only.
    metric
        ``'lncc'``, ``'mind'`` or ``'auto'`` (see :mod:`.similarity`).
    levels, iterations
        Working voxel sizes (mm) and Adam iterations per level.
    fixed_weight, moving_weight
        Weights on the fixed/moving grids (3D arrays or ``(1, 1, X, Y, Z)``), e.g. from
        :func:`.masks.similarity_weight`; the fixed working grid covers the fixed weight only.
    lr
        Adam step (mm of head-surface motion per iteration) at the first level; default
        ``0.15 * level``.
    generator
        Unused (the optimisation is deterministic); accepted for a uniform API.
    cross_contrast
        False where the images are known to share a contrast: ``'auto'`` then keeps LNCC
        unless their intensities run opposite ways (:func:`.similarity.auto_threshold`).

    Returns
    -------
    numpy.ndarray
        The 4x4 RAS matrix mapping fixed RAS to moving RAS (pulling the moving image).
    """
    del generator
    if metric not in METRICS:
        raise ValueError(f'metric must be one of {METRICS}, got {metric!r}')
    moving = _volume(moving, 'moving')
    fixed = _volume(fixed, 'fixed')
    if len(levels) != len(iterations):
        raise ValueError(f'levels and iterations differ in length: {levels}, {iterations}')
    fw = _weight_tensor(fixed_weight, fixed_grid.shape, fixed.device, 'fixed_weight')
    mw = _weight_tensor(moving_weight, moving_grid.shape, moving.device, 'moving_weight')
    matrix = (
        _moments_init(moving_grid, mw, fixed_grid, fw)
        if init is None
        else np.asarray(init, dtype=float)
    )
    centre = _weighted_centre(fixed_grid, fw)
    box = _fixed_box(fixed_grid, fw)
    chosen = None if metric == 'auto' else metric
    for voxel, iters in zip(levels, iterations):
        level = _AffineLevel(moving, moving_grid, fixed, fixed_grid, float(voxel), fw, mw, box)
        if chosen is None:
            chosen = level.resolve_metric(metric, [matrix], cross_contrast)
        level.set_metric(chosen)
        step = lr * voxel / levels[0] if lr is not None else 0.15 * voxel
        matrix, _ = _run_affine(level, matrix, centre, rigid, int(iters), step, verbose)
    return matrix


#: Least share of the smaller image's weight that the two images must hold in common for a
#: pose to be judged in the affine search (a start far off, e.g. an image stored 300 mm from
#: the origin left where its header puts it, shares nothing, and its empty mean scored 0).
MIN_OVERLAP = 0.25

#: Tilt (degrees) tried about each axis together with the best ``WRONG_HEADER_TURNS`` turns of
#: the axes (a wrong header) in the affine search: a head pitched by 35 degrees in a header
#: with two axes flipped is found only with it.
WRONG_HEADER_TILT = 30.0
WRONG_HEADER_TURNS = 3


def _cube_rotations() -> list[np.ndarray]:
    """The 24 proper rotations that permute and flip the world axes."""
    out = []
    for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        for signs in np.ndindex(2, 2, 2):
            m = np.zeros((3, 3))
            for i, (j, s) in enumerate(zip(perm, signs)):
                m[i, j] = -1.0 if s else 1.0
            if np.linalg.det(m) > 0:
                out.append(m)
    return out


def _euler(rx, ry, rz) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = (
        np.cos(rx),
        np.sin(rx),
        np.cos(ry),
        np.sin(ry),
        np.cos(rz),
        np.sin(rz),
    )
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def _principal_axes(grid: Geometry, weight: torch.Tensor) -> np.ndarray:
    """Eigenvectors (columns, ascending) of the weight's second moments, on a grid of at most
    4 mm blocks (a 1 mm image's axes do not need 16 million points)."""
    weight, grid = reduce_blocks(weight.detach(), grid, 8.0)
    w = weight[0, 0].cpu().double().numpy()
    idx = np.argwhere(w > 0.05)
    vals = w[tuple(idx.T)]
    ras = idx @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    mean = (ras * vals[:, None]).sum(0) / vals.sum()
    d = ras - mean
    cov = (d * vals[:, None]).T @ d / vals.sum()
    _, vecs = np.linalg.eigh(cov)
    return vecs


def robust_affine_init(
    moving: torch.Tensor,
    moving_grid: Geometry,
    fixed: torch.Tensor,
    fixed_grid: Geometry,
    *,
    rigid: bool = False,
    candidates: Sequence[np.ndarray] | None = None,
    metric: str = 'auto',
    fixed_weight=None,
    moving_weight=None,
    max_angle: float = 45.0,
    angle_step: float = 15.0,
    voxel: float = 8.0,
    top_k: int = 3,
    iterations: int = 30,
    verbose: bool = False,
    cross_contrast: bool | None = None,
) -> np.ndarray:
    """A starting affine that does not fail on whole-head scans.

    1. Weights: the given ones, else our own head masks cut to the top 140 mm
       (:func:`.masks.head_mask`), so neck and field of view do not count.
    2. Centres of mass of the weights; every candidate rotation turns about them.
    3. Candidates: rotations on a grid of Euler angles within ``max_angle`` degrees (steps of
       ``angle_step``), the 23 other permutations and flips of the world axes (a wrong header;
       the best ``WRONG_HEADER_TURNS`` of them also tilted by ``WRONG_HEADER_TILT`` degrees about
       each axis), the 4 rotations that align the principal axes, and ``candidates`` (4x4 world
       matrices, e.g. a network's prediction), all scored at ``voxel`` mm by the weighted
       similarity; a pose where the weights share less than ``MIN_OVERLAP`` of the smaller one
       scores as no match.
    4. The ``top_k`` best (plus every given candidate) get a short optimisation
       (``iterations`` at ``voxel`` mm, rigid or affine as asked); the lowest dissimilarity wins.

    ``metric`` ``'auto'`` is resolved at the start (``cross_contrast`` as in
    :func:`optimise_affine`). Returns the 4x4 RAS matrix (fixed RAS -> moving RAS); refine it
    with :func:`optimise_affine`. About 3-4 s for a 2 mm whole-head pair on one (shared) CPU thread.
    """
    moving = _volume(moving, 'moving')
    fixed = _volume(fixed, 'fixed')
    device = fixed.device
    fw = _weight_tensor(fixed_weight, fixed_grid.shape, device, 'fixed_weight')
    mw = _weight_tensor(moving_weight, moving_grid.shape, device, 'moving_weight')
    if fw is None:
        fw = torch.as_tensor(
            masks.head_mask(fixed, fixed_grid), dtype=torch.float32, device=device
        )[None, None]
    if mw is None:
        mw = torch.as_tensor(
            masks.head_mask(moving, moving_grid), dtype=torch.float32, device=device
        )[None, None]
    c_f = _weighted_centre(fixed_grid, fw)
    c_m = _weighted_centre(moving_grid, mw)
    level = _AffineLevel(
        moving, moving_grid, fixed, fixed_grid, voxel, fw, mw, _fixed_box(fixed_grid, fw)
    )

    def about_centres(rot):
        m = np.eye(4)
        m[:3, :3] = rot
        m[:3, 3] = c_m - rot @ c_f
        return m

    angles = np.deg2rad(np.arange(-max_angle, max_angle + 1e-6, angle_step))
    rotations = [_euler(a, b, c) for a in angles for b in angles for c in angles]
    turns = [r for r in _cube_rotations() if not np.allclose(r, np.eye(3))]
    first_turn = len(rotations)
    rotations += turns
    ax_f = _principal_axes(fixed_grid, fw)
    ax_m = _principal_axes(moving_grid, mw)
    for signs in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)):
        rot = ax_m @ np.diag(signs) @ ax_f.T
        if np.linalg.det(rot) < 0:
            rot = ax_m @ np.diag(signs) @ np.diag((1, 1, -1)) @ ax_f.T
        rotations.append(rot)
    pool = [about_centres(r) for r in rotations]
    extra = [np.asarray(c, dtype=float) for c in (candidates or [])]

    # judged at the centres of mass and at each given start (the header, a network's guess)
    metric = level.resolve_metric(metric, [about_centres(np.eye(3))] + extra, cross_contrast)
    level.set_metric(metric)

    def dissimilarity(matrices) -> np.ndarray:
        """Scores of the matrices; infinite where the images barely meet (or NaN)."""
        with torch.no_grad():
            mats = torch.as_tensor(np.stack(matrices), dtype=torch.float32, device=device)
            out = [level.loss(chunk, overlap=True) for chunk in mats.split(16)]
            score = torch.cat([o[0] for o in out]).cpu().numpy()
            shared = torch.cat([o[1] for o in out]).cpu().numpy()
        return np.where((shared >= MIN_OVERLAP) & np.isfinite(score), score, np.inf)

    scores = dissimilarity(pool)
    # a wrong header on a head that is also tilted: the best few turns of the axes, each
    # tilted by up to WRONG_HEADER_TILT degrees about each axis (a pure turn can sit 35 degrees
    # from the answer, too far for the short optimisation below)
    best_turns = np.argsort(scores[first_turn:first_turn + len(turns)])[:WRONG_HEADER_TURNS]
    tilt = np.deg2rad((-WRONG_HEADER_TILT, 0.0, WRONG_HEADER_TILT))
    tilts = [_euler(a, b, c) for a in tilt for b in tilt for c in tilt]
    tilted = [about_centres(turns[i] @ t) for i in best_turns for t in tilts
              if not np.allclose(t, np.eye(3))]
    pool += tilted
    scores = np.concatenate([scores, dissimilarity(tilted + extra)])
    order = list(np.argsort(scores[: len(pool)])[:top_k])
    starts = [pool[i] for i in order] + extra
    start_scores = [scores[i] for i in order] + list(scores[len(pool):])
    best, best_score = None, np.inf
    for k, (start, before) in enumerate(zip(starts, start_scores)):
        if not np.isfinite(before):  # a start that leaves the images apart
            if verbose:
                log.info('affine init start %d: the images barely meet there, left out', k)
            continue
        step = 0.15 * voxel
        matrix, _ = _run_affine(level, start, c_f, rigid, iterations, step)
        score = float(dissimilarity([matrix])[0])
        if verbose:
            given = ' (given)' if k >= len(order) else ''
            log.info('affine init start %d%s: dissimilarity %.4f -> %.4f', k, given, before, score)
        if score < best_score:
            best, best_score = matrix, score
    if best is None:  # nothing met: the centres of mass at least bring the images together
        log.warning('affine search: no pose tried lets the images meet; starting from their '
                    'centres of mass')
        best = about_centres(np.eye(3))
    return best


# --------------------------------------------------------------------------------------------
# Deformable


def _roi(weight: torch.Tensor | None, grid: Geometry, margin_mm: float, threshold: float):
    """Index box (lo, hi) of the weight's support plus a margin, and which sides are inside."""
    shape = np.asarray(grid.shape)
    if weight is None:
        return np.zeros(3, int), shape.copy()
    mask = weight[0, 0].detach().cpu().numpy() > threshold
    if not mask.any():
        raise ValueError(f'weight is nowhere above {threshold}')
    idx = np.argwhere(mask)
    pad = np.ceil(margin_mm / grid.voxel_sizes).astype(int)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + 1 + pad, shape)
    return lo, hi


def _level_shape(roi_shape, vox, level: float):
    out = []
    for n, v in zip(roi_shape, vox):
        if level <= v * 1.01 or n <= 2:
            out.append(int(n))
        else:
            out.append(max(2, round((n - 1) * v / level)) + 1)
    return tuple(out)


def _taper(shape, spacing, lo, hi, full, ramp_mm, device):
    """1 inside, falling smoothly to 0 at the ROI sides that lie inside the full grid."""
    out = torch.ones(shape, device=device)
    for axis, (n, s) in enumerate(zip(shape, spacing)):
        pos = torch.arange(n, device=device, dtype=torch.float32) * s
        ramp = torch.ones(n, device=device)
        length = (n - 1) * s
        if lo[axis] > 0:
            ramp = ramp * ((pos / ramp_mm).clamp(0, 1))
        if hi[axis] < full[axis]:
            ramp = ramp * (((length - pos) / ramp_mm).clamp(0, 1))
        ramp = ramp * ramp * (3 - 2 * ramp)  # smoothstep
        view = [1, 1, 1]
        view[axis] = n
        out = out * ramp.view(view)
    return out[None, None]


def _smoothness(v: torch.Tensor, spacing) -> torch.Tensor:
    """Mean squared Jacobian (mm per mm) of a voxel velocity (1, 3, ...) with ``spacing`` mm."""
    s = torch.as_tensor(spacing, dtype=v.dtype, device=v.device).view(1, 3, 1, 1, 1)
    v_mm = v * s
    total = 0.0
    for axis in range(3):
        d = v_mm.diff(dim=2 + axis) / float(spacing[axis])
        total = total + (d * d).sum(dim=1).mean()
    return total


def _exp(v: torch.Tensor, steps: int, exact: bool) -> torch.Tensor:
    """``exp(v)`` by scaling and squaring; with ``exact=False`` its gradient is approximated.

    The approximation passes the gradient through as if ``exp(v) = v`` (first order, as in
    log-domain demons), which skips the backward pass through the squarings: 4-5 times cheaper
    per step on the CPU, and Adam normalises the step size anyway.
    """
    if exact:
        return spatial.integrate_svf(v, steps)
    with torch.no_grad():
        disp = spatial.integrate_svf(v, steps)
    return disp + (v - v.detach())


def _resize(volume: torch.Tensor, shape) -> torch.Tensor:
    if tuple(volume.shape[2:]) == tuple(shape):
        return volume
    return F.interpolate(volume, size=tuple(shape), mode='trilinear', align_corners=True)


def optimise_svf(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    grid: Geometry,
    *,
    init_velocity: torch.Tensor | None = None,
    lam: float = 0.5,
    metric: str = 'auto',
    levels: Sequence[float] = (8.0, 4.0, 2.0),
    iterations: Sequence[int] = (60, 40, 20),
    symmetric: bool = False,
    weight=None,
    moving_weight=None,
    steps: int = 7,
    loop_steps: int = LOOP_STEPS,
    lr: float = 0.2,
    margin_mm: float = 16.0,
    roi_threshold: float = ROI_THRESHOLD,
    velocity_factor: float | Sequence[float] = VELOCITY_FACTOR,
    exact_gradient: bool = False,
    crop: bool = False,
    cross_contrast: bool | None = None,
    similarity_scale: float = 1.0,
    metric_weight=None,
    report: dict | None = None,
    verbose: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, np.ndarray]:
    """Diffeomorphic registration of ``moving`` to ``fixed`` (both on ``grid``) by an SVF.

    Parameters
    ----------
    moving, fixed
        ``(1, 1, X, Y, Z)`` tensors on the one grid ``grid`` (resample moving through the affine
        first).
    init_velocity
        ``(1, 3, X, Y, Z)`` velocity in voxel units of ``grid`` to start from (a network's).
    lam
        Regularisation in [0, 1] as the hypernetwork's lambda: 0 sharpest, 1 smoothest.
    metric
        ``'lncc'``, ``'mind'`` or ``'auto'``.
    levels, iterations
        Image spacing (mm) and Adam iterations per level, coarse to fine. A level finer than
        the grid works at the grid's spacing. The finest levels cost most: for a whole-head
        T1w pair on one CPU thread about 0.12 s per iteration at 2 mm and 0.3 s at 1.5 mm
        (LNCC; session 37).
    symmetric
        Optimise in the mid-space: moving warped by ``exp(v / 2)``, fixed by ``exp(-v / 2)``
        (twice the cost per step; off by default, see the module docstring).
    weight
        Weight of the similarity on ``grid`` (e.g. :func:`.masks.similarity_weight` of the
        fixed image). The field lives in the bounding box of ``weight > 0.01`` plus
        ``margin_mm`` and tapers to zero over that margin; None: the whole grid, uniform.
    moving_weight
        A weight on ``grid`` that belongs to the moving image (e.g. 0 in a lesion of it,
        :func:`.masks.lesion_keep`, resampled like ``moving``): warped along with the moving
        image at every step and multiplied into ``weight``, so it follows the tissue it
        marks as the field moves it.
    steps, loop_steps
        Scaling-and-squaring steps (as ``spatial.integrate_svf``) with which the caller
        integrates the result; inside the optimisation ``min(steps, loop_steps)``
        (:data:`LOOP_STEPS`).
    lr
        Adam step in voxels of each level's field grid (cosine decay to a fifth).
    margin_mm
        Margin around the weight's box over which the field tapers to zero.
    roi_threshold
        The weight above which voxels belong to the box.
    velocity_factor
        The field's spacing as a multiple of each level's image spacing: one number, or one
        per level.
    exact_gradient
        Backpropagate through the scaling and squaring (slower; see the module docstring).
    crop
        Return the velocity on the box it lives in (the weight's box plus ``margin_mm``, at
        ``grid``'s spacing) with the voxel matrix from the box to ``grid``, instead of
        embedded in zeros on the whole grid.

    Returns
    -------
    torch.Tensor
        ``(1, 3, X, Y, Z)`` velocity in voxel units of ``grid``:
        ``spatial.warp_voxel(moving, spatial.integrate_svf(v, steps))`` matches ``fixed``, and
        ``exp(-v)`` is the inverse.
    (torch.Tensor, numpy.ndarray)
        With ``crop``: the velocity ``(1, 3, *box)`` in voxel units of ``grid`` and the 4x4
        matrix from box voxels to ``grid`` voxels (a shift). The field tapers to zero at the
        box's faces inside the grid, so ``exp`` on the box, extended by its border values
        (``spatial.upsample_field``), is ``exp`` on the grid, for a fraction of the cost (the
        upper head's box with its margin is about 60 % of a 256 mm cube). Integrating on the
        coarser field grid instead was faster still, but its forward and inverse agreed only
        within 0.18 voxel at 2 mm (0.1 on the finer grid).
    cross_contrast
        Whether the images differ in contrast: True runs at :func:`cross_contrast_lambda`
        of ``lam``; None decides by the metric (MIND: different contrasts).
    similarity_scale
        Factor on the dissimilarity in the loss. The dissimilarity is a mean weighted by
        ``weight``, so a voxel's pull on the field is its weight over the weights' sum: the
        more of the image a weight covers, the weaker each voxel's pull against the
        smoothness. ``register`` passes the weight's sum over that of the rough brain weight
        lambda was calibrated with (:func:`.masks.brain_weight`), so that a weight covering
        the whole of a skull-stripped brain smooths no more than the default
        (:data:`.register.SIMILARITY_REFERENCE`).
    metric_weight
        A weight on ``grid`` inside which ``'auto'`` judges the contrasts, in place of
        ``weight`` (``register``: the rough brain weight, where the similarity counts the
        whole head).
    report
        A dict to fill with what was used: ``metric`` (the one ``'auto'`` chose),
        ``cross_contrast`` and ``lambda`` (the refinement's).
    """
    moving = _volume(moving, 'moving')
    fixed = _volume(fixed, 'fixed')
    if moving.shape != fixed.shape or tuple(fixed.shape[2:]) != tuple(grid.shape):
        raise ValueError(
            f'moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must both be on the '
            f'grid {tuple(grid.shape)}'
        )
    if not 0 <= lam <= 1:
        raise ValueError(f'lam must lie in [0, 1], got {lam}')
    if not similarity_scale > 0:
        raise ValueError(f'similarity_scale must be positive, got {similarity_scale}')
    if metric not in METRICS:
        raise ValueError(f'metric must be one of {METRICS}, got {metric!r}')
    if len(levels) != len(iterations):
        raise ValueError(f'levels and iterations differ in length: {levels}, {iterations}')
    factors = np.asarray(velocity_factor, dtype=float).reshape(-1)
    if factors.size == 1:
        factors = np.repeat(factors, len(levels))
    if factors.size != len(levels) or np.any(factors < 1):
        raise ValueError(
            f'velocity_factor must be one number or one per level, each at least 1; got '
            f'{velocity_factor} for {len(levels)} levels'
        )
    device = fixed.device
    w = _weight_tensor(weight, grid.shape, device, 'weight')
    mw = _weight_tensor(moving_weight, grid.shape, device, 'moving_weight')
    jw = _weight_tensor(metric_weight, grid.shape, device, 'metric_weight')
    if init_velocity is not None and tuple(init_velocity.shape) != (1, 3, *grid.shape):
        raise ValueError(
            f'init_velocity must be {(1, 3, *grid.shape)}, got {tuple(init_velocity.shape)}'
        )
    lo, hi = _roi(w, grid, margin_mm, roi_threshold)
    # the similarity counts inside the weight's box only; the margin is for the field's taper
    in_lo, in_hi = _roi(w, grid, 0.0, roi_threshold)
    in_lo, in_hi = in_lo - lo, in_hi - lo
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    roi_shape = tuple(int(b - a) for a, b in zip(lo, hi))
    mov = moving[(..., *sl)]
    fix = fixed[(..., *sl)]
    wroi = w[(..., *sl)] if w is not None else None
    mwroi = mw[(..., *sl)] if mw is not None else None
    jwroi = jw[(..., *sl)] if jw is not None else None
    mov = _normalise(mov, wroi)
    fix = _normalise(fix, wroi)
    vox = [float(v) for v in grid.voxel_sizes]
    steps = min(int(steps), int(loop_steps))
    half_steps = max(steps - 1, 0)

    velocity = None
    if init_velocity is not None:
        velocity = init_velocity[(..., *sl)].to(device, torch.float32)
    chosen = None if metric == 'auto' else metric
    lam_used = None
    for level, iters, factor in zip(levels, iterations, factors):
        shape = _level_shape(roi_shape, vox, float(level))
        spacing = [v * (n - 1) / max(m - 1, 1) for v, n, m in zip(vox, roi_shape, shape)]
        vshape = _level_shape(roi_shape, vox, float(level) * float(factor))
        vspacing = [v * (n - 1) / max(m - 1, 1) for v, n, m in zip(vox, roi_shape, vshape)]
        sig = _antialias_sigmas(vox, float(level))
        m_l = blur_resize(mov, sig, shape)
        f_l = blur_resize(fix, sig, shape)
        w_l = _resize(wroi, shape) if wroi is not None else torch.ones_like(f_l)
        # the moving image and its own weight, sampled together by each step's field
        mcat = m_l if mwroi is None else torch.cat([m_l, _resize(mwroi, shape)], dim=1)
        # the inner box on this level, its voxel positions on the level and field grids
        ratio = [(n - 1) / max(m - 1, 1) for n, m in zip(roi_shape, shape)]
        a = [min(math.ceil(lo_ / r), m - 1) for lo_, r, m in zip(in_lo, ratio, shape)]
        b = [max(math.floor((hi_ - 1) / r) + 1, a_ + 1) for hi_, r, a_ in zip(in_hi, ratio, a)]
        inner = tuple(slice(a_, b_) for a_, b_ in zip(a, b))
        pos = spatial.identity_coords([b_ - a_ for a_, b_ in zip(a, b)], device)
        pos = (pos + torch.tensor(a, dtype=pos.dtype, device=device).view(3, 1, 1, 1))[None]
        to_field = torch.tensor(
            [(vm - 1) / max(m - 1, 1) for vm, m in zip(vshape, shape)], device=device
        ).view(1, 3, 1, 1, 1)

        # the field grid spans the level grid corner to corner: trilinear upsampling
        # (align_corners) onto the inner box, one axis at a time
        upsample = [spatial.interpolation_matrix(vm, m, a_, b_, device)
                    for vm, m, a_, b_ in zip(vshape, shape, a, b)]

        def level_disp(disp_field, upsample=upsample, to_field=to_field):
            """The field's displacement (level voxels) at the inner box's voxels: 2-3 times
            cheaper forward and backward than ``grid_sample`` at ``pos * to_field``, and than
            upsampling the whole level grid (margin included) and cropping."""
            return spatial.resize_separable(disp_field, upsample) / to_field

        f_in, w_in = f_l[(..., *inner)], w_l[(..., *inner)]
        if chosen is None:
            with torch.no_grad():
                if velocity is not None:
                    vel = spatial.resize_field(velocity, vshape)
                    m_chk = spatial.sample_grid(
                        mcat, pos + level_disp(spatial.integrate_svf(vel, steps))
                    )
                else:
                    m_chk = mcat[(..., *inner)]
                w_chk = w_in if jwroi is None else _resize(jwroi, shape)[(..., *inner)]
                w_chk = w_chk if mwroi is None else w_chk * m_chk[:, 1:]
                chosen = _resolve_metric(metric, m_chk[:, :1], f_in, w_chk, cross_contrast)
        if lam_used is None:
            across = (chosen == 'mind') if cross_contrast is None else bool(cross_contrast)
            lam_used = cross_contrast_lambda(lam) if across else float(lam)
            if report is not None:
                report.update(metric=chosen, cross_contrast=across, **{'lambda': lam_used})
        dissim = _Dissimilarity(chosen, max(min(spacing), 1e-3))
        # Features (MIND) of the warped images, recomputed each step: warping descriptors
        # instead biased the optimum by 0.3 voxel on a synthetic warp (local rotations and
        # shears change the descriptors).
        ffeat = dissim.features(f_in, split=True)
        fstats = None if symmetric else dissim.fixed_stats(ffeat)
        fcat = torch.cat([f_l, w_l], dim=1)
        taper = _taper(vshape, vspacing, lo, hi, grid.shape, margin_mm, device)
        if velocity is None:
            param = torch.zeros(1, 3, *vshape, device=device)
        else:
            param = spatial.resize_field(velocity, vshape).detach().clone()
        param.requires_grad_()
        opt = Adam([param], eps=ADAM_EPS)
        # Gradients per field voxel independent of the grid size, so that ADAM_EPS means the same
        # at every level and image size.
        scale = param[0, 0].numel()
        first = last = None
        t_level = time.perf_counter()
        for it in range(int(iters)):
            v = param * taper
            if symmetric:
                fwd = level_disp(_exp(v / 2, half_steps, exact_gradient))
                bwd = level_disp(_exp(-v / 2, half_steps, exact_gradient))
                moved = spatial.sample_grid(mcat, pos + fwd)
                # the weight rides along with the fixed image (one sampling, no gradient)
                target = spatial.sample_grid(fcat, pos + bwd)
                target, wt = dissim.features(target[:, :1], split=True), target[:, 1:].detach()
                stats = None
            else:
                disp = level_disp(_exp(v, steps, exact_gradient))
                moved = spatial.sample_grid(mcat, pos + disp)
                target, wt, stats = ffeat, w_in, fstats
            if mwroi is not None:
                wt = wt * moved[:, 1:].detach()
            moved = dissim.features(moved[:, :1], split=True)
            sim = dissim(moved, target, wt, stats)
            loss = ((1 - lam_used) * similarity_scale * sim
                    + lam_used * SMOOTHNESS_SCALE * _smoothness(v, vspacing))
            (loss * scale).backward()
            opt.step(_lr_schedule(lr, it, int(iters), final=0.2))
            last = float(sim.detach())
            if first is None:
                first = last
        velocity = (param * taper).detach()
        if verbose:
            log.info(
                'svf level %g mm (%s, lambda %.2f, images %s, field %s): dissimilarity %.4f -> '
                '%.4f in %d iterations, %.1f s',
                level,
                chosen,
                lam_used,
                'x'.join(str(b_ - a_) for a_, b_ in zip(a, b)),
                'x'.join(map(str, vshape)),
                first if first is not None else float('nan'),
                last if last is not None else float('nan'),
                iters,
                time.perf_counter() - t_level,
            )
    if crop:
        to_grid = np.eye(4)
        to_grid[:3, 3] = lo
        if velocity is None:
            return torch.zeros(1, 3, *roi_shape, device=device), to_grid
        return spatial.resize_field(velocity, roi_shape), to_grid
    out = torch.zeros(1, 3, *grid.shape, device=device)
    if velocity is None:
        return out
    out[(..., *sl)] = spatial.resize_field(velocity, roi_shape)
    return out
