"""Spatial core of the engine: grids, resampling, velocity-field integration, composition.

Conventions
-----------
* Volumes are tensors of shape ``(B, C, X, Y, Z)``, indexed like the NIfTI array (``X`` is the
  first voxel axis).
* A *grid* is a :class:`~synthmorph_app.io.images.Geometry`: a shape and a 4x4 voxel-to-RAS
  matrix. Coordinates are voxel indices of a grid, or RAS millimetres.
* Voxel displacement fields are ``(B, 3, X, Y, Z)`` in voxel units of the grid they live on;
  world fields are the same in RAS mm.
* Sampling uses ``align_corners=True`` semantics: voxel index ``i`` is the centre of voxel ``i``.

voxelmorph (``vxm.integrate_vec``, ``vxm.spatial_transform``) integrates and warps fields that
live on one grid in voxel units. We wrap it and add what it lacks: sampling between two grids of
different shapes and orientations through RAS matrices (:func:`sample_grid`), which every
world-space operation needs.

The network space
-----------------
:func:`network_grid` is the grid the networks see, as in ``mri_synthmorph``: an isotropic grid
in LIA orientation (first axis towards Left, second Inferior, third Anterior) of ``shape`` voxels
of ``voxel_size`` mm, centred on the centre of the image's field of view. Our default models use
2 mm and 128^3 (a 256 mm cube), half the resolution of the official 1 mm, 256^3 space.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import nibabel as nb
import numpy as np
import torch
import torch.nn.functional as F
import voxelmorph as vxm

from ..io.images import Geometry
from ..io.transforms import Transform

#: Direction cosines of LIA: columns are the world directions of the voxel axes.
LIA = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def fov_center(geometry: Geometry) -> np.ndarray:
    """RAS position (mm) of the centre of a grid's field of view."""
    centre = (np.asarray(geometry.shape, dtype=float) - 1) / 2
    return geometry.affine[:3, :3] @ centre + geometry.affine[:3, 3]


def lia_order(data: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, Geometry]:
    """The same voxels stored in the axis order and directions nearest to LIA, and their grid.

    Only the storage changes (axes permuted and flipped, the affine to match), not a voxel's
    value or its world position. :func:`.register.register` reads both images this way, so
    its result does not depend on how an image is stored: masks, block averages and intensity
    samples run along voxel axes, and a head stored LPS and the same head stored PIR moved a
    joint registration by up to 14 mm where cortex is ambiguous (0.6 mm on average). An image
    already nearest to LIA (FreeSurfer's conformed space) comes back as it is.
    ``data`` may have further axes after the first three (a field's vectors).
    """
    return _reordered(data, geometry, nb.orientations.axcodes2ornt(tuple('LIA')))


def original_order(data: np.ndarray, lia_geometry: Geometry, geometry: Geometry) -> np.ndarray:
    """The inverse of :func:`lia_order`: ``data`` on ``lia_geometry`` stored as ``geometry``."""
    target = nb.orientations.io_orientation(geometry.affine)
    out, _ = _reordered(data, lia_geometry, target)
    return out


def _reordered(data, geometry: Geometry, target) -> tuple[np.ndarray, Geometry]:
    start = nb.orientations.io_orientation(geometry.affine)
    change = nb.orientations.ornt_transform(start, target)
    if np.array_equal(change, [[0, 1], [1, 1], [2, 1]]):
        return data, geometry
    out = np.ascontiguousarray(nb.orientations.apply_orientation(data, change))
    affine = geometry.affine @ nb.orientations.inv_ornt_aff(change, geometry.shape)
    return out, Geometry(tuple(int(n) for n in out.shape[:3]), affine)


def network_grid(
    geometry: Geometry, voxel_size: float = 2.0, shape: int | tuple = 128, center=None
) -> Geometry:
    """The isotropic LIA grid of ``shape`` voxels of ``voxel_size`` mm centred on the FOV.

    ``center`` (RAS mm) overrides the centre of ``geometry``'s field of view.
    """
    shape = (shape,) * 3 if np.isscalar(shape) else tuple(int(s) for s in shape)
    center = fov_center(geometry) if center is None else np.asarray(center, dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = LIA * float(voxel_size)
    affine[:3, 3] = center - affine[:3, :3] @ ((np.asarray(shape, dtype=float) - 1) / 2)
    return Geometry(shape, affine)


def as_tensor(x, device=None, dtype=torch.float32) -> torch.Tensor:
    """A float32 tensor on ``device`` from an array or tensor."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype, device=device)


def volume_tensor(data: np.ndarray, device=None) -> torch.Tensor:
    """A ``(1, 1, X, Y, Z)`` float32 tensor from a 3D array."""
    if data.ndim != 3:
        raise ValueError(f'expected a 3D array, got shape {data.shape}')
    return as_tensor(data, device)[None, None]


def identity_coords(shape, device=None) -> torch.Tensor:
    """Voxel coordinates ``(3, X, Y, Z)`` of a grid of ``shape``."""
    axes = [torch.arange(s, device=device, dtype=torch.float32) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing='ij'))


def affine_coords(matrix, shape, device=None) -> torch.Tensor:
    """``matrix`` (4x4, voxel of the output grid to voxel of the input) applied to a grid.

    Returns voxel coordinates ``(3, *shape)`` in the input grid.
    """
    m = as_tensor(matrix, device)
    grid = identity_coords(shape, device).reshape(3, -1)
    return (m[:3, :3] @ grid + m[:3, 3:]).reshape(3, *shape)


def sample_grid(
    volume: torch.Tensor, coords: torch.Tensor, mode: str = 'linear', padding: str = 'zeros'
) -> torch.Tensor:
    """Sample ``volume`` (B, C, X, Y, Z) at voxel ``coords`` (3, ...) or (B, 3, ...).

    The output has the spatial shape of ``coords``, which may differ from the volume's: this is
    the two-grid sampling that ``vxm.spatial_transform`` (one grid) does not offer.
    ``mode`` is ``'linear'`` or ``'nearest'``; ``padding`` is a ``grid_sample`` padding mode.
    """
    if volume.ndim != 5:
        raise ValueError(f'volume must be (B, C, X, Y, Z), got shape {tuple(volume.shape)}')
    if coords.ndim == 4:
        coords = coords[None]
    if coords.ndim != 5 or coords.shape[1] != 3:
        raise ValueError(f'coords must be (3, X, Y, Z) or (B, 3, X, Y, Z), got {coords.shape}')
    sizes = torch.tensor(volume.shape[2:], dtype=coords.dtype, device=coords.device)
    scale = (2.0 / (sizes - 1).clamp(min=1)).view(1, 3, 1, 1, 1)
    norm = coords * scale - 1.0
    grid = norm.permute(0, 2, 3, 4, 1).flip(-1)  # grid_sample wants (z, y, x) order
    if grid.shape[0] != volume.shape[0]:
        grid = grid.expand(volume.shape[0], *grid.shape[1:])
    mode = 'bilinear' if mode == 'linear' else mode
    return F.grid_sample(volume, grid.to(volume.dtype), mode=mode, padding_mode=padding,
                         align_corners=True)


def resample_linear(
    volume: torch.Tensor,
    source: Geometry,
    target: Geometry,
    matrix: np.ndarray | None = None,
    mode: str = 'linear',
    padding: str = 'zeros',
) -> torch.Tensor:
    """Resample ``volume`` on grid ``source`` onto grid ``target`` through a world affine.

    ``matrix`` maps RAS points of the target space to RAS points of the source space (the
    pulling direction); None means identity (pure regridding).
    """
    world = np.eye(4) if matrix is None else np.asarray(matrix, dtype=float)
    vox = np.linalg.inv(source.affine) @ world @ target.affine
    return sample_grid(volume, affine_coords(vox, target.shape, volume.device), mode, padding)


def field_world_to_voxel(field: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """Convert a RAS mm displacement (B, 3, ...) into voxel units of a grid with ``affine``."""
    inv = as_tensor(np.linalg.inv(affine)[:3, :3], field.device)
    return torch.einsum('ij,bj...->bi...', inv, field)


def field_voxel_to_world(field: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """Convert a voxel displacement (B, 3, ...) on a grid with ``affine`` to RAS mm."""
    lin = as_tensor(np.asarray(affine)[:3, :3], field.device)
    return torch.einsum('ij,bj...->bi...', lin, field)


def integrate_svf(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Exponentiate a stationary velocity field by scaling and squaring.

    ``velocity`` is ``(B, 3, X, Y, Z)`` in voxel units of its grid; the result is the
    displacement of ``exp(velocity)`` in the same units. ``exp(-v)`` is its inverse. Uses
    ``vxm.integrate_vec`` with border padding, so the field does not collapse at the edges.
    """
    if velocity.ndim != 5 or velocity.shape[1] != 3:
        raise ValueError(f'velocity must be (B, 3, X, Y, Z), got {tuple(velocity.shape)}')
    if steps < 0:
        raise ValueError(f'integration steps must be >= 0, got {steps}')
    transformer = partial(
        vxm.nn.functional.spatial_transform, non_spatial_dims=(0, 1), padding_mode='border'
    )
    return vxm.integrate_vec(velocity, steps, non_spatial_dims=(0,), transformer=transformer)


def interpolation_matrix(n_in: int, n_out: int, start: int = 0, stop: int | None = None,
                         device=None, dtype=torch.float32) -> torch.Tensor:
    """Linear interpolation from ``n_in`` points onto ``n_out`` points spanning the same
    interval (corners shared, as ``align_corners=True``): rows ``start:stop`` of the
    ``(n_out, n_in)`` matrix, for the output points ``start`` to ``stop - 1`` only.
    """
    stop = n_out if stop is None else int(stop)
    if not 0 <= start < stop <= n_out or n_in < 1:
        raise ValueError(f'rows {start}:{stop} of an interpolation onto {n_out} points '
                         f'from {n_in}')
    out = torch.zeros(stop - start, n_in, dtype=torch.float64)
    rows = torch.arange(stop - start)
    if n_in == 1:
        out[:, 0] = 1
        return out.to(device, dtype)
    pos = torch.arange(start, stop, dtype=torch.float64) * (n_in - 1) / max(n_out - 1, 1)
    left = pos.floor().long().clamp(max=n_in - 2)
    frac = pos - left
    out[rows, left] = 1 - frac
    out[rows, left + 1] += frac
    return out.to(device, dtype)


def resize_separable(volume: torch.Tensor, matrices) -> torch.Tensor:
    """``volume`` (B, C, X, Y, Z) resampled one axis at a time by ``matrices`` (one
    ``(n_out, n_in)`` matrix per axis, e.g. :func:`interpolation_matrix`).

    Trilinear resizing as three matrix products, onto any box of the output grid: for a
    velocity field upsampled into the part of a finer grid where a similarity counts, forward
    and backward took 50 ms against 120 ms for ``F.interpolate`` of the whole grid and a crop
    (3 x 73 x 67 x 83 onto 122 x 110 x 144 of 144 x 132 x 164, one CPU thread), whose backward
    also fills the whole grid's gradient.
    """
    mx, my, mz = matrices
    out = torch.matmul(volume, mz.T)  # (B, C, X, Y, z)
    out = torch.matmul(my, out)  # (B, C, X, y, z)
    b, c, x, y, z = out.shape
    return torch.matmul(mx, out.reshape(b, c, x, y * z)).reshape(b, c, -1, y, z)


def resize_field(field: torch.Tensor, shape) -> torch.Tensor:
    """Resize a voxel displacement field (B, 3, ...) to ``shape``, rescaling its vectors.

    Grids share their corners (``align_corners=True``), so a vector of ``d`` voxels on ``n``
    points becomes ``d * (m - 1) / (n - 1)`` voxels on ``m`` points, axis by axis.
    """
    old = torch.tensor(field.shape[2:], dtype=field.dtype, device=field.device)
    new = torch.tensor(tuple(shape), dtype=field.dtype, device=field.device)
    out = F.interpolate(field, size=tuple(shape), mode='trilinear', align_corners=True)
    factor = ((new - 1) / (old - 1).clamp(min=1)).view(1, 3, 1, 1, 1)
    return out * factor


def upsample_field(field: torch.Tensor, coarse_to_fine: np.ndarray, shape) -> torch.Tensor:
    """Resample a voxel displacement (B, 3, ...) from a coarse grid onto a fine one.

    ``coarse_to_fine`` (4x4) maps coarse voxel indices to fine voxel indices (e.g. ``2 i + 0.5``
    for a grid made by averaging 2x2x2 blocks); vectors are mapped by its linear part, and the
    field is extended by its border values. Unlike :func:`resize_field`, the two grids need not
    share their corners.
    """
    m = np.asarray(coarse_to_fine, dtype=float)
    coords = affine_coords(np.linalg.inv(m), shape, field.device)
    out = sample_grid(field, coords, 'linear', padding='border')
    return torch.einsum('ij,bj...->bi...', as_tensor(m[:3, :3], field.device), out)


def warp_voxel(volume: torch.Tensor, disp: torch.Tensor, mode='linear', padding='zeros'):
    """Warp ``volume`` by a voxel displacement on its own grid: ``out(x) = volume(x + disp)``."""
    coords = identity_coords(disp.shape[2:], disp.device)[None] + disp
    return sample_grid(volume, coords, mode, padding)


def transform_coords(xfm: Transform, target: Geometry, source: Geometry, device=None):
    """Voxel coordinates in ``source`` of every voxel of ``target`` under ``xfm``.

    ``xfm`` maps target (reference) RAS to source (moving) RAS. Returns ``(3, *target.shape)``.
    """
    shape = target.shape
    world = affine_coords(target.affine, shape, device)  # RAS of every target voxel
    if xfm.field is not None:
        fgeom = xfm.field_geometry
        field = as_tensor(np.moveaxis(xfm.field, -1, 0), device)[None]
        if fgeom == target:
            disp = field[0]
        else:
            to_field = np.linalg.inv(fgeom.affine) @ target.affine
            disp = sample_grid(field, affine_coords(to_field, shape, device))[0]
        world = world + disp
    m = as_tensor(np.linalg.inv(source.affine) @ xfm.affine, device)
    flat = world.reshape(3, -1)
    return (m[:3, :3] @ flat + m[:3, 3:]).reshape(3, *shape)


#: Target voxels :func:`apply_transform` resamples at once. Its coordinate arrays take about 70
#: bytes a voxel, so a 0.4 mm head (100 million voxels and more) is done in slabs of the first
#: axis: moving an image onto a 69-million-voxel grid peaked at 4.9 GB in one piece.
CHUNK_VOXELS = 1 << 23


def row_slab(geometry: Geometry, start: int, stop: int) -> Geometry:
    """Rows ``start:stop`` of the first voxel axis of ``geometry``, as a grid of their own."""
    shift = np.eye(4)
    shift[0, 3] = start
    return Geometry((stop - start, *geometry.shape[1:]), geometry.affine @ shift)


def apply_transform(
    volume: torch.Tensor,
    source: Geometry,
    xfm: Transform,
    target: Geometry,
    mode: str = 'linear',
    fill: float = 0.0,
    chunk_voxels: int = CHUNK_VOXELS,
) -> torch.Tensor:
    """Resample ``volume`` (on ``source``) into ``target`` through ``xfm``.

    ``mode`` is ``'linear'``, ``'nearest'`` or ``'labels'`` (each label interpolated linearly as a
    one-hot channel, the most likely label wins: smoother than nearest, never invents labels).
    Voxels that map outside the source get ``fill``. Large targets are resampled in slabs of
    at most ``chunk_voxels`` voxels along their first axis (the result is the same).
    """
    if mode not in ('linear', 'nearest', 'labels'):
        raise ValueError(f"mode must be 'linear', 'nearest' or 'labels', got {mode!r}")
    labels = torch.unique(volume) if mode == 'labels' else None
    rows = max(1, int(chunk_voxels) // max(1, int(np.prod(target.shape[1:]))))
    on_target = xfm.field is not None and xfm.field_geometry == target
    parts = []
    for start in range(0, target.shape[0], rows):
        stop = min(start + rows, target.shape[0])
        part, part_xfm = target, xfm
        if (start, stop) != (0, target.shape[0]):
            part = row_slab(target, start, stop)
            if on_target:  # slice the field rather than interpolate it at its own voxels
                part_xfm = replace(xfm, field=xfm.field[start:stop], field_geometry=part)
        coords = transform_coords(part_xfm, part, source, volume.device)
        if mode == 'labels':
            parts.append(_resample_labels(volume, coords, fill, labels))
            continue
        out = sample_grid(volume, coords, mode)
        if fill != 0:
            inside = sample_grid(torch.ones_like(volume[:, :1]), coords, 'linear')
            out = torch.where(inside > 0.5 - 1e-6, out, torch.full_like(out, fill))
        parts.append(out)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _resample_labels(
    volume: torch.Tensor, coords: torch.Tensor, fill: float, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Label-aware resampling: argmax over linearly interpolated one-hot channels."""
    best = torch.zeros((volume.shape[0], 1, *coords.shape[1:]), device=volume.device)
    out = torch.full_like(best, fill)
    for label in torch.unique(volume) if labels is None else labels:
        prob = sample_grid((volume == label).to(torch.float32), coords, 'linear')
        take = prob > best
        out = torch.where(take, label.to(out.dtype), out)
        best = torch.where(take, prob, best)
    return out


def matrix_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Principal square root of a 4x4 affine (``H @ H == matrix``), via its real Schur form.

    Exact where the linear part turns by less than 180 degrees; a half turn has no real
    square root (see :func:`mid_space_split`).
    """
    from scipy.linalg import sqrtm

    root = np.real(sqrtm(np.asarray(matrix, dtype=float)))
    root[3] = (0, 0, 0, 1)
    return root


def mid_space_split(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where two images meet: ``(to_moving, to_fixed)`` with ``to_moving @ inv(to_fixed)``
    equal to ``matrix`` (fixed RAS -> moving RAS).

    Halfway as a rule: ``(H, H^-1)`` with ``H`` the principal square root, so neither image is
    resampled more than the other. A matrix that turns by about 180 degrees (a header with two
    axes flipped, which the affine search puts right) has no real square root: the meeting
    space is then the fixed image's, ``(matrix, I)``.
    """
    matrix = np.asarray(matrix, dtype=float)
    half = matrix_sqrt(matrix)
    scale = max(1.0, float(np.abs(matrix[:3, :3]).max()))
    if (
        np.all(np.isfinite(half))
        and abs(np.linalg.det(half[:3, :3])) > 1e-3 * scale**3
        and np.allclose(half @ half, matrix, atol=1e-4 * scale, rtol=0)
    ):
        return half, np.linalg.inv(half)
    return matrix.copy(), np.eye(4)
