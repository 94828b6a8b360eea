"""Point-set fits and matrix functions shared by the affine networks.

Conventions
-----------
* Point sets are ``(B, N, 3)`` tensors, weights ``(B, N)``; the fits return ``(B, 4, 4)``
  homogeneous matrices ``M`` with ``y ~ M[:3, :3] @ x + M[:3, 3]``.
* The affine networks fit in a *centred* voxel frame of the full-resolution network grid (the
  origin at the grid centre, ``(shape - 1) / 2``); :func:`centred_to_voxel` converts the result to
  zero-based voxel indices, as voxelmorph's ``VxmAffineFeatureDetector`` does.
* Everything is differentiable with autograd. The fits and matrix functions run in float64
  whatever the input dtype, and cast back: they are tiny and ill-conditioned fits in float32 were
  the main source of noise in the reference implementation.

Why our own code: voxelmorph 0.3.4 (PyTorch) has no weighted affine or rigid fit, and torch has no
matrix logarithm. :func:`fit_affine` solves the same weighted least-squares problem as
``vxm.utils.fit_affine`` (voxelmorph TF), centred first for conditioning; :func:`decompose_rigid`
reproduces ``affine_matrix_to_params`` + ``ParamsToAffineMatrix`` (voxelmorph TF) as used by
``VxmAffineFeatureDetector(rigid=True)``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    'barycenters',
    'centred_to_voxel',
    'channel_weights',
    'decompose_rigid',
    'fit_affine',
    'fit_rigid',
    'matrix_exp',
    'matrix_log',
    'matrix_sqrt',
    'symmetrize',
]


def _check_points(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> None:
    if x.ndim != 3 or x.shape[-1] != 3 or x.shape != y.shape:
        raise ValueError(
            f'point sets must both be (B, N, 3), got {tuple(x.shape)} and {tuple(y.shape)}'
        )
    if w.shape != x.shape[:2]:
        raise ValueError(f'weights must be (B, N) = {tuple(x.shape[:2])}, got {tuple(w.shape)}')


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den != 0``, else 0 (TF ``divide_no_nan``), with finite gradients."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def barycenters(features: torch.Tensor, full_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Barycentre and mass of every channel of non-negative feature maps.

    Parameters
    ----------
    features : (B, K, x, y, z) tensor
        Non-negative feature maps on a grid that subdivides the full-resolution grid
        ``full_shape`` (``X / x`` full voxels per feature voxel along each axis).
    full_shape : sequence of 3 int
        Shape of the full-resolution network grid.

    Returns
    -------
    centres : (B, K, 3) tensor
        Barycentres in centred voxel coordinates of the full grid: feature voxel ``i`` of ``n``
        sits at ``(i - (n - 1) / 2) * X / n``, which is the centre of the block of full voxels
        it covers. Same as ``ne.utils.barycenter(normalize=True, shift_center=True) * shape``;
        a channel that is zero everywhere gets centre 0 (``divide_no_nan``).
    mass : (B, K) tensor
        Sum of each channel.
    """
    if features.ndim != 5:
        raise ValueError(f'features must be (B, K, x, y, z), got {tuple(features.shape)}')
    mass = features.sum(dim=(2, 3, 4))
    centres = []
    for axis, (n, full) in enumerate(zip(features.shape[2:], full_shape)):
        coord = torch.arange(n, dtype=features.dtype, device=features.device)
        coord = (coord - (n - 1) / 2) * (float(full) / n)
        other = tuple(d for d in (2, 3, 4) if d != axis + 2)
        profile = features.sum(dim=other)  # (B, K, n)
        centres.append(_safe_div(profile @ coord, mass))
    return torch.stack(centres, dim=-1), mass


def channel_weights(mass_1: torch.Tensor, mass_2: torch.Tensor) -> torch.Tensor:
    """Pair weights: the product of each channel's share of the total power in both images."""
    share_1 = _safe_div(mass_1, mass_1.sum(dim=-1, keepdim=True))
    share_2 = _safe_div(mass_2, mass_2.sum(dim=-1, keepdim=True))
    return share_1 * share_2


def _centre(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted centroid (B, 1, 3) and the centred points."""
    total = w.sum(dim=1, keepdim=True)[..., None]  # (B, 1, 1)
    mean = _safe_div((w[..., None] * x).sum(dim=1, keepdim=True), total)
    return mean, x - mean


def _homogeneous(linear: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(*linear.shape[:-2], 4, 4, dtype=linear.dtype, device=linear.device)
    out[..., :3, :3] = linear
    out[..., :3, 3] = shift
    out[..., 3, 3] = 1
    return out


def fit_affine(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, ridge: float = 0.0):
    """Weighted least-squares affine ``M`` with ``y ~ M x``.

    Minimises ``sum_i w_i |A x_i + t - y_i|^2 + ridge * |A - I|_F^2``. The points are centred
    on their weighted centroids first, so ``t`` is exact and the normal equations stay well
    conditioned; with ``ridge = 0`` the solution is that of ``vxm.utils.fit_affine(y, x, w)``
    (note voxelmorph's argument order: its *source* is our ``y``). ``ridge`` is added to the
    weighted scatter matrix ``sum_i w_i x_i x_i^T`` (voxel^2 times weight): it pulls a
    degenerate fit (coplanar points, all weights zero) towards the identity and barely moves
    one that the data determine.

    Parameters
    ----------
    x, y : (B, N, 3) tensors
        Corresponding points.
    w : (B, N) tensor
        Non-negative weights.
    ridge : float
        Tikhonov weight towards the identity linear part.

    Returns
    -------
    (B, 4, 4) tensor
        In ``x.dtype`` (computed in float64).
    """
    _check_points(x, y, w)
    dtype = x.dtype
    x, y, w = x.double(), y.double(), w.double()
    mx, xc = _centre(x, w)
    my, yc = _centre(y, w)
    xtw = xc.transpose(1, 2) * w[:, None, :]  # (B, 3, N)
    eye = torch.eye(3, dtype=x.dtype, device=x.device)
    lhs = xtw @ xc + ridge * eye  # (B, 3, 3)
    rhs = xtw @ yc + ridge * eye  # (B, 3, 3)
    linear = torch.linalg.solve(lhs, rhs).transpose(1, 2)  # A with A xc ~ yc
    shift = my[:, 0] - (linear @ mx[:, 0, :, None])[..., 0]
    return _homogeneous(linear, shift).to(dtype)


def fit_rigid(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted Kabsch (Procrustes) fit: proper rotation ``R`` and shift ``t``, ``y ~ R x + t``.

    ``R = V diag(1, 1, det(V U^T)) U^T`` from the SVD ``U S V^T`` of the weighted
    cross-covariance of the centred points, so ``det R = +1`` (no reflections). The fit is
    symmetric by construction: swapping ``x`` and ``y`` gives exactly the inverse transform.
    The gradient is undefined where singular values coincide (e.g. fewer than three
    non-collinear weighted points).
    """
    _check_points(x, y, w)
    dtype = x.dtype
    x, y, w = x.double(), y.double(), w.double()
    mx, xc = _centre(x, w)
    my, yc = _centre(y, w)
    cov = (xc.transpose(1, 2) * w[:, None, :]) @ yc  # (B, 3, 3) = sum w x y^T
    u, _, vh = torch.linalg.svd(cov)
    v = vh.transpose(1, 2)
    sign = torch.sign(torch.linalg.det(v @ u.transpose(1, 2)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    flip = torch.ones(x.shape[0], 3, dtype=x.dtype, device=x.device)
    flip = torch.cat((flip[:, :2], sign[:, None]), dim=1)
    rot = v @ torch.diag_embed(flip) @ u.transpose(1, 2)
    shift = my[:, 0] - (rot @ mx[:, 0, :, None])[..., 0]
    return _homogeneous(rot, shift).to(dtype)


def matrix_sqrt(a: torch.Tensor, iterations: int = 30, tol: float = 1e-13) -> torch.Tensor:
    """Principal square root of square matrices (..., n, n) by Denman-Beavers iteration.

    Converges for matrices with no eigenvalues on the closed negative real axis (every affine
    transform that is not close to a reflection or a half-turn). Differentiable with autograd.
    """
    y = a
    z = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    for _ in range(iterations):
        y_next = 0.5 * (y + torch.linalg.inv(z))
        z = 0.5 * (z + torch.linalg.inv(y))
        step, size = (y_next - y).detach().abs().max(), y.detach().abs().max()
        done = bool(step <= tol * max(1.0, float(size)))
        y = y_next
        if done:
            break
    return y


def matrix_log(a: torch.Tensor, tol: float = 0.25, terms: int = 24) -> torch.Tensor:
    """Principal matrix logarithm (..., n, n) by inverse scaling and squaring.

    Takes square roots (:func:`matrix_sqrt`) until ``|A^(1/2^k) - I|`` is below ``tol``, sums
    the Mercator series of ``log(I + X)`` and multiplies by ``2^k``. Runs in float64 and casts
    back. The log of an affine matrix (last row ``0 0 0 1``) has last row zero.
    """
    dtype = a.dtype
    x = a.double()
    eye = torch.eye(a.shape[-1], dtype=x.dtype, device=x.device)
    k = 0
    while float((x.detach() - eye).abs().sum(dim=-1).amax()) > tol and k < 40:
        x = matrix_sqrt(x)
        k += 1
    d = x - eye
    term = d
    out = d.clone()
    for n in range(2, terms + 1):
        term = term @ d
        out = out + ((-1) ** (n + 1) / n) * term
    return (out * float(2**k)).to(dtype)


def matrix_exp(a: torch.Tensor) -> torch.Tensor:
    """Matrix exponential (``torch.linalg.matrix_exp``), computed in float64 and cast back."""
    return torch.linalg.matrix_exp(a.double()).to(a.dtype)


def symmetrize(forward: torch.Tensor, backward: torch.Tensor, mode: str = 'log') -> torch.Tensor:
    """Combine a fixed->moving fit and a moving->fixed fit into one fixed->moving matrix.

    ``mode='log'`` (our models): the log-Euclidean mean of ``forward`` and ``backward^-1``,
    ``exp((log F - log B) / 2)``. Swapping the two images swaps ``F`` and ``B`` and so gives
    exactly the inverse matrix: the registration is inverse-consistent by construction.
    ``mode='mean'`` (voxelmorph's ``VxmAffineFeatureDetector``, the official models): the
    arithmetic mean ``(F + B^-1) / 2``, which is only approximately inverse-consistent.
    """
    if mode == 'log':
        return matrix_exp(0.5 * (matrix_log(forward) - matrix_log(backward)))
    if mode == 'mean':
        return 0.5 * (forward + torch.linalg.inv(backward))
    raise ValueError(f"symmetrize mode must be 'log' or 'mean', got {mode!r}")


def _rotation_to_angles(rot: torch.Tensor) -> torch.Tensor:
    """Euler angles (radians) of ``R = X @ Y @ Z`` (voxelmorph ``rotation_matrix_to_angles``)."""

    def clip(v):
        return v.clamp(-1, 1)

    ang2 = torch.asin(clip(rot[..., 0, 2]))
    c2 = torch.cos(ang2)
    locked = (ang2.abs() - 0.5 * math.pi).abs() < 1e-6
    ang1 = torch.atan2(clip(_safe_div(-rot[..., 1, 2], c2)), clip(_safe_div(rot[..., 2, 2], c2)))
    ang3 = torch.atan2(clip(_safe_div(-rot[..., 0, 1], c2)), clip(_safe_div(rot[..., 0, 0], c2)))
    ang1 = torch.where(locked, torch.zeros_like(ang1), ang1)
    ang3 = torch.where(locked, torch.atan2(clip(rot[..., 1, 0]), clip(rot[..., 1, 1])), ang3)
    return torch.stack((ang1, ang2, ang3), dim=-1)


def _angles_to_rotation(ang: torch.Tensor) -> torch.Tensor:
    c1, c2, c3 = torch.cos(ang).unbind(-1)
    s1, s2, s3 = torch.sin(ang).unbind(-1)
    rows = (
        c2 * c3, -c2 * s3, s2,
        s1 * s2 * c3 + c1 * s3, -s1 * s2 * s3 + c1 * c3, -s1 * c2,
        -c1 * s2 * c3 + s1 * s3, c1 * s2 * s3 + s1 * c3, c1 * c2,
    )  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*ang.shape[:-1], 3, 3)


def decompose_rigid(matrix: torch.Tensor) -> torch.Tensor:
    """Drop scaling and shear from affine matrices (B, 4, 4), keeping rotation and shift.

    Reproduces voxelmorph's ``affine_matrix_to_params`` followed by ``ParamsToAffineMatrix``
    on the shift and rotation parameters (how ``VxmAffineFeatureDetector(rigid=True)`` and so
    ``synthmorph.rigid.1.h5`` make a rigid transform): ``A = R @ S @ E`` with ``S @ E`` the
    upper Cholesky factor of ``A^T A`` (first scale negated if ``det A < 0``), the rotation
    ``R = A (S E)^-1`` re-built from its X-Y-Z Euler angles; the shift is kept.
    """
    dtype = matrix.dtype
    m = matrix.double()
    lin = m[..., :3, :3]
    upper = torch.linalg.cholesky(lin.transpose(-1, -2) @ lin).transpose(-1, -2)
    scale = torch.diagonal(upper, dim1=-2, dim2=-1)
    sign = torch.sign(torch.linalg.det(lin))
    scale = torch.cat((scale[..., :1] * sign[..., None], scale[..., 1:]), dim=-1)
    shear = torch.triu(torch.diag_embed(1 / scale) @ upper, diagonal=1)
    strip = torch.diag_embed(scale) @ (shear + torch.eye(3, dtype=m.dtype, device=m.device))
    rot = _angles_to_rotation(_rotation_to_angles(lin @ torch.linalg.inv(strip)))
    return _homogeneous(rot, m[..., :3, 3]).to(dtype)


def centred_to_voxel(matrix: torch.Tensor, shape) -> torch.Tensor:
    """Convert (B, 4, 4) matrices from the centred frame of a grid to zero-based voxel indices.

    ``V = C^-1 @ M @ C`` with ``C`` the shift by ``-(shape - 1) / 2``.
    """
    centre = torch.tensor([(s - 1) / 2 for s in shape], dtype=matrix.dtype, device=matrix.device)
    lin = matrix[..., :3, :3]
    shift = matrix[..., :3, 3] - (lin @ centre) + centre
    return _homogeneous(lin, shift)
