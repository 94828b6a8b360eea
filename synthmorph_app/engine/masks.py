"""Quick head and brain estimates that weight the similarity during optimisation.

Whole-head scans carry neck, shoulders, eyes and fields of view that differ between images; left
in the similarity they pull the brain alignment. These estimates need no model and take well
under a second at 2 mm:

* :func:`head_mask`: Otsu threshold of the lightly smoothed image, largest connected component,
  holes filled, then cut to the top ``top_mm`` (140 mm) of the head along the world superior
  axis, so that the neck does not count whatever the field of view.
* :func:`brain_weight`: a rough brain region: head voxels deeper than ``depth_mm`` (scalp and
  skull, 10 mm) below the head surface and within ``brain_mm`` (120 mm) of the top of the head,
  blurred into a soft weight, on a small floor over the rest of the cut head.
* :func:`mask_weight`: the same floor over the head, but 1 inside a brain mask the user gives
  (a template's ``desc-brain_mask``, a mask from skull-stripping), in place of the rough
  estimate: the exact brain, cortex included, and nothing of the skull.
* :func:`lesion_keep`: 0 inside a lesion mask the user gives (a stroke, a resection cavity, a
  tumour), 1 elsewhere: multiplied into a weight, it takes the lesion out of the similarity
  (cost-function masking, as ANTs' ``-x`` and fMRIPrep's ``label-lesion_roi`` do).

A registration asks several of these about one image: :class:`Head` holds its head, searched
once, and each of them takes it as ``head=``.

All assume a head roughly upright in world space (superior = +S), as in scanner coordinates;
the affine search in :mod:`.optimise` rotates only within its range around that. They run in
NumPy and SciPy on the CPU at about 3 mm and are mapped back to the input grid.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from scipy import ndimage

from ..errors import InputImageError
from ..io.images import Geometry
from . import spatial

#: Height (mm) of the head kept below its top: the neck below it does not count.
TOP_MM = 140.0


def _as_array(volume) -> np.ndarray:
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().to('cpu', torch.float32).numpy()
    volume = np.asarray(volume, dtype=np.float32)
    volume = volume.reshape(volume.shape[-3:]) if volume.ndim == 5 else volume
    if volume.ndim != 3:
        raise ValueError(f'expected a 3D volume or (1, 1, X, Y, Z), got shape {volume.shape}')
    return volume


def otsu_threshold(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of ``values``: the cut that maximises the between-class variance."""
    values = np.asarray(values, dtype=float).ravel()
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def coarse_stride(voxel_sizes, target_mm: float) -> tuple[int, int, int]:
    """Voxel steps per axis that sample a grid of ``voxel_sizes`` at about ``target_mm``."""
    return tuple(max(1, round(target_mm / v)) for v in voxel_sizes)


def upsample_coarse(small: np.ndarray, stride, shape) -> np.ndarray:
    """A coarse array (``data[::stride]``) back on the full ``shape``: each coarse voxel
    fills its block of ``stride`` voxels."""
    index = [np.minimum(np.arange(n) // s, m - 1) for n, s, m in zip(shape, stride, small.shape)]
    return small[np.ix_(*index)]


def _superior(grid: Geometry, shape, stride) -> np.ndarray:
    """World S coordinate (mm) of the voxels of a strided grid."""
    ijk = np.meshgrid(*[np.arange(0, n, s) for n, s in zip(shape, stride)], indexing='ij')
    row = grid.affine[2]
    return row[0] * ijk[0] + row[1] * ijk[1] + row[2] * ijk[2] + row[3]


def _head_small(data: np.ndarray, grid: Geometry, stride):
    small = data[:: stride[0], :: stride[1], :: stride[2]]
    vox = grid.voxel_sizes * np.asarray(stride)
    smooth = ndimage.gaussian_filter(small, sigma=2.0 / vox)
    mask = smooth > otsu_threshold(smooth)
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    mask = ndimage.binary_closing(mask, iterations=2, border_value=0) | mask
    filled = ndimage.binary_fill_holes(mask)
    # Slices open at the border of the FOV (a cut neck): fill holes slice by slice too.
    for axis in range(3):
        filled |= np.stack(
            [ndimage.binary_fill_holes(s) for s in np.moveaxis(filled, axis, 0)], axis=axis
        )
    return filled, vox


class Head:
    """The head of one image, searched once (at about 3 mm) when first asked for.

    :func:`head_mask`, :func:`brain_weight`, :func:`mask_weight` and :func:`similarity_weight`
    take it as ``head=`` so that a registration, which asks several of them about one image,
    finds its head once (0.1-0.25 s a time on one thread).
    """

    def __init__(self, volume, grid: Geometry):
        self.data = _as_array(volume)
        if self.data.shape != tuple(grid.shape):
            raise ValueError(
                f'volume shape {self.data.shape} does not match its grid {grid.shape}')
        self.grid = grid
        self.stride = coarse_stride(grid.voxel_sizes, 3.0)

    @cached_property
    def _small(self) -> tuple[np.ndarray, np.ndarray]:
        return _head_small(self.data, self.grid, self.stride)

    @property
    def small(self) -> np.ndarray:
        """The filled head (boolean) on the strided grid ``data[::stride]``."""
        return self._small[0]

    @property
    def small_voxel_sizes(self) -> np.ndarray:
        """Voxel sizes (mm) of the strided grid."""
        return self._small[1]


def _head(volume, grid: Geometry, head: Head | None) -> Head:
    if head is None:
        return Head(volume, grid)
    if head.grid is not grid and (
        tuple(head.grid.shape) != tuple(grid.shape)
        or not np.allclose(head.grid.affine, grid.affine)
    ):
        raise ValueError('head was found on another grid')
    return head


def head_mask(
    volume, grid: Geometry, *, top_mm: float = TOP_MM, head: Head | None = None
) -> np.ndarray:
    """Boolean head mask on ``grid``, cut to the top ``top_mm`` of the head (no neck).

    ``volume`` is a 3D array or a ``(1, 1, X, Y, Z)`` tensor on ``grid``. ``top_mm=None`` keeps
    the whole head. ``head``: the :class:`Head` of ``volume`` when already at hand.
    """
    head = _head(volume, grid, head)
    data, stride = head.data, head.stride
    mask = head.small.copy()
    if top_mm is not None and mask.any():
        sup = _superior(grid, data.shape, stride)
        top = np.percentile(sup[mask], 99.9)
        mask &= sup >= top - top_mm
    return upsample_coarse(mask, stride, data.shape)


def brain_weight(
    volume,
    grid: Geometry,
    *,
    depth_mm: float = 10.0,
    brain_mm: float = 120.0,
    top_mm: float = TOP_MM,
    floor: float = 0.1,
    blur_mm: float = 6.0,
    head: Head | None = None,
) -> np.ndarray:
    """A rough brain weight in [0, 1] (float32, shape of ``grid``).

    1 deep in the upper head (deeper than ``depth_mm`` under the head surface, within
    ``brain_mm`` of its top), blurred by ``blur_mm`` (SD), and ``floor`` elsewhere in the head cut
    to ``top_mm``; 0 outside the head. ``head``: the :class:`Head` of ``volume`` when at hand.
    """
    found = _head(volume, grid, head)
    data, stride = found.data, found.stride
    head, vox = found.small, found.small_voxel_sizes
    if not head.any():
        return np.zeros(data.shape, np.float32)
    sup = _superior(grid, data.shape, stride)
    top = np.percentile(sup[head], 99.9)
    depth = ndimage.distance_transform_edt(head, sampling=vox)
    brain = (depth >= depth_mm) & (sup >= top - brain_mm)
    soft = ndimage.gaussian_filter(brain.astype(np.float32), sigma=blur_mm / vox)
    soft = soft / max(float(soft.max()), 1e-6)
    cut = head & (sup >= top - top_mm)
    weight = np.where(cut, floor + (1 - floor) * soft, 0.0).astype(np.float32)
    return upsample_coarse(weight, stride, data.shape)


def mask_values(mask) -> np.ndarray:
    """A mask image's values as the engine reads them (float32, on its own grid): values in
    [0, 1] as probabilities, a map with larger values (labels, such as an ``aseg``) as 1 where
    non-zero; NaN as 0."""
    values = np.asarray(mask.dataobj, dtype=np.float32).reshape(mask.shape[:3])
    values = np.nan_to_num(values, nan=0.0)
    if float(values.max()) > 1.0:
        values = (values != 0).astype(np.float32)
    return np.clip(values, 0.0, 1.0)


def _mask_on_grid(mask, grid: Geometry, refusal: str) -> np.ndarray:
    """:func:`mask_values` of a mask image (any grid, same world space) resampled linearly onto
    ``grid``. Raises :class:`InputImageError` with ``refusal`` where it marks no voxel of the
    grid."""
    values = mask_values(mask)
    with torch.inference_mode():
        out = spatial.resample_linear(
            torch.as_tensor(values)[None, None], Geometry.from_image(mask), grid
        )[0, 0].numpy()
    if float(out.max()) < 0.5:
        raise InputImageError(refusal)
    return out


def mask_weight(
    mask,
    volume,
    grid: Geometry,
    *,
    floor: float = 0.1,
    blur_mm: float = 1.0,
    top_mm: float = TOP_MM,
    what: str = 'mask',
    head: Head | None = None,
) -> np.ndarray:
    """The weight of a given brain mask in [0, 1] (float32, shape of ``grid``).

    ``mask`` is a 3D nibabel image in the world space of ``volume`` (the image on ``grid``), on
    any grid: it is resampled linearly by world coordinates, then blurred by ``blur_mm`` (SD).
    Values within [0, 1] count as brain probabilities; a map with larger values (labels, such
    as an ``aseg``) counts where it is non-zero. The weight is 1 in the brain, ``floor`` over
    the rest of the head cut to ``top_mm`` (:func:`head_mask`), so that the skull still helps
    a little, and 0 outside. Raises :class:`InputImageError` naming ``what`` when the mask
    covers no voxel of the image. ``head``: the :class:`Head` of ``volume`` when at hand.
    """
    head = _head(volume, grid, head)
    brain = _mask_on_grid(
        mask, grid, f'The {what} covers no voxel of its image: it must lie in the same world '
        'space (a brain mask of that image, or of the template on its grid).')
    if blur_mm > 0:
        brain = ndimage.gaussian_filter(brain, sigma=blur_mm / np.asarray(grid.voxel_sizes))
        brain = np.clip(brain / float(brain.max()), 0.0, 1.0)
    inside = head_mask(volume, grid, top_mm=top_mm, head=head)
    return np.where(inside, floor + (1 - floor) * brain, brain).astype(np.float32)


#: Margin (mm) around a given lesion that leaves the similarity too: the mask's edge and the
#: tissue just around a lesion (oedema, gliosis, a rim of partial volume) are rarely normal.
LESION_MARGIN_MM = 2.0


def lesion_keep(mask, grid: Geometry, *, margin_mm: float = LESION_MARGIN_MM,
                what: str = 'lesion mask') -> np.ndarray:
    """What of ``grid`` a lesion mask leaves to the similarity: 0 in the lesion, 1 elsewhere.

    ``mask`` is a 3D nibabel image in the world space of the image on ``grid`` (any grid):
    values within [0, 1] count as lesion probabilities, a map with larger values (labels) as
    lesion where non-zero. It is resampled linearly by world coordinates and grown by
    ``margin_mm`` (a grey-value dilation: the lesion's largest value within that distance).
    Raises :class:`InputImageError` naming ``what`` when the mask marks no voxel of the image
    (empty, or in another world space).
    """
    lesion = _mask_on_grid(
        mask, grid, f'The {what} marks no voxel of its image: it must be non-zero in the '
        'lesion and lie in the same world space as the image (a mask drawn on that image).')
    if margin_mm > 0:
        radius = np.asarray(margin_mm) / np.asarray(grid.voxel_sizes, dtype=float)
        r = np.maximum(np.floor(radius), 0).astype(int)
        offsets = np.indices(2 * r + 1).reshape(3, -1).T - r
        ball = (((offsets / np.maximum(radius, 1e-6)) ** 2).sum(axis=1) <= 1.0).reshape(2 * r + 1)
        # within the lesion's box and the rim only (a 1 mm head grid is 16 million voxels)
        where = np.argwhere(lesion > 0)
        box = tuple(slice(max(int(lo) - k, 0), int(hi) + k + 1)
                    for lo, hi, k in zip(where.min(axis=0), where.max(axis=0), r))
        lesion[box] = ndimage.grey_dilation(lesion[box], footprint=ball, mode='constant')
    return (1.0 - lesion).astype(np.float32)


def similarity_weight(
    volume, grid: Geometry, kind: str = 'brain', *, mask=None, what: str = 'mask',
    head: Head | None = None,
) -> torch.Tensor:
    """The weight the optimisers use, as a ``(1, 1, X, Y, Z)`` tensor on ``volume``'s device.

    ``kind`` is ``'brain'`` (:func:`brain_weight`), ``'head'`` (:func:`head_mask`, cut to the
    top 140 mm) or ``'none'`` (ones). A ``mask`` image (:func:`mask_weight`, named ``what`` in
    errors) takes the place of ``kind``. ``head``: the :class:`Head` of ``volume`` when at hand.
    """
    device = volume.device if isinstance(volume, torch.Tensor) else None
    if mask is not None:
        weight = mask_weight(mask, volume, grid, what=what, head=head)
    elif kind == 'brain':
        weight = brain_weight(volume, grid, head=head)
    elif kind == 'head':
        weight = head_mask(volume, grid, head=head).astype(np.float32)
    elif kind == 'none':
        weight = np.ones(grid.shape, np.float32)
    else:
        raise ValueError(f"kind must be 'brain', 'head' or 'none', got {kind!r}")
    return torch.as_tensor(weight, device=device)[None, None]
