"""Intensity normalisation of network inputs.

The networks are trained on synthetic images min-max normalised to [0, 1]; real images get the
same, made robust to a few very bright voxels (vessels, fat, artefacts) by using a high
percentile instead of the maximum. Before that, :func:`clean_intensities` puts the background at
0 and cuts artefacts far outside the tissue's range, which the head masks, the similarity and
the zero fill outside each field of view would otherwise take for anatomy.
:func:`fill_lesion` fills a lesion the user marks with the tissue around it.
"""

from __future__ import annotations

import numpy as np
import torch

#: Intensities above this many times the bright tissue's level (the 99.9th percentile of the
#: voxels above the background) are artefacts (a few spikes of 10^6 in an int32 image): cut
#: there. Every shared image and template stays under 2.8 times.
SPIKE_FACTOR = 5.0
#: A background of noise (:func:`clear_noisy_background`): the level of the local median
#: residual, as a share of the bright level, the mm it is averaged over, and the share of the
#: field of view it must cover.
NOISE_LEVEL = 0.2
NOISE_SMOOTH_MM = 8.0
NOISY_SHARE = 0.05


def clean_intensities(data: np.ndarray) -> np.ndarray:
    """The intensities of a 3D image as the engine reads them (float32, a new array if changed).

    * The floor is the 0.1th percentile (the background in a head image): values below it
      (a few negative artefacts, padding of -32768) are raised to it, and the floor is moved to
      0, so an image stored with an offset (background at -500, say) has its background where
      the resampling's zero fill is. An image whose background is 0 is left as it is.
    * Values above ``SPIKE_FACTOR`` times the bright tissue's level are cut there.

    Percentiles are estimated on at most about two million voxels.
    """
    data = np.asarray(data, dtype=np.float32)
    sample = data.ravel()[:: max(1, data.size // 2_000_000)]
    floor = float(np.percentile(sample, 0.1))
    if floor != 0.0 or float(data.min()) < floor:
        data = np.maximum(data, floor) - floor
    above = sample[sample > floor] - floor
    if above.size:
        ceiling = SPIKE_FACTOR * float(np.percentile(above, 99.9))
        if ceiling > 0 and float(data.max()) > ceiling:
            data = np.minimum(data, ceiling)
    return data


def clear_noisy_background(data: np.ndarray, voxel_sizes) -> np.ndarray:
    """``data`` with a background of noise over the whole intensity range set to 0.

    An MP2RAGE ``UNI`` image divides two inversions, which is undefined where there is no
    signal: the air around the head is salt-and-pepper noise as bright as tissue. Head masks
    then take the whole field of view for the head, and on 12 such T1w the affine search
    missed 3 by 15-35 mm. Such noise differs from its neighbours everywhere; tissue does so
    at its edges only. On a grid of about 3 mm, the absolute difference from the 3^3 median,
    averaged over ``NOISE_SMOOTH_MM``, exceeds ``NOISE_LEVEL`` of the bright level (99.5th
    percentile) across the whole background of such an image, and at scattered spots of
    ordinary ones (at most 0.7 % of the field of view in the shared images and templates).
    Where the parts above that level which touch the field of view's border make more than
    ``NOISY_SHARE`` of it, they are set to 0 (the voxels of each coarse cell); otherwise
    ``data`` comes back as it is.
    """
    from scipy import ndimage

    from .masks import coarse_stride, upsample_coarse

    vox = np.asarray(voxel_sizes, dtype=float)
    stride = coarse_stride(vox, 3.0)
    small = data[:: stride[0], :: stride[1], :: stride[2]]
    bright = float(np.percentile(small, 99.5))
    if bright <= 0 or min(small.shape) < 3:
        return data
    residual = np.abs(small - ndimage.median_filter(small, size=3))
    local = ndimage.gaussian_filter(residual, sigma=NOISE_SMOOTH_MM / (vox * np.asarray(stride)))
    noisy = local > NOISE_LEVEL * bright
    if noisy.mean() < NOISY_SHARE:
        return data
    labels, _ = ndimage.label(noisy)
    faces = [np.take(labels, i, axis=a).ravel() for a in range(3) for i in (0, -1)]
    border = np.setdiff1d(np.unique(np.concatenate(faces)), [0])
    noisy = np.isin(labels, border)
    if noisy.mean() < NOISY_SHARE:
        return data
    cleared = upsample_coarse(noisy, stride, data.shape)
    return np.where(cleared, np.float32(0), data).astype(np.float32, copy=False)


#: Scales (mm) of :func:`fill_lesion`'s normalised convolutions, fine to coarse, and the grid
#: (mm) it works on.
FILL_SCALES_MM = (4.0, 8.0, 16.0, 32.0)
FILL_GRID_MM = 4.0


def fill_lesion(data: np.ndarray, keep: np.ndarray, voxel_sizes) -> np.ndarray:
    """``data`` with what ``keep`` (in [0, 1], 0 in a lesion) leaves out filled in smoothly
    from the tissue around it (a new float32 array).

    The fill is a normalised convolution, ``G * (data keep) / G * keep``, at each of
    :data:`FILL_SCALES_MM` (Gaussian SD), the finest where enough tissue lies near, coarser
    deeper inside a large lesion; computed on a grid of about :data:`FILL_GRID_MM` mm and
    blended in by ``1 - keep``. It is featureless by design: a lesion's own contrast (a dark
    cavity, a bright tumour) no longer reaches the surrounding tissue through a similarity's
    windows and blurs, nor the networks, and nothing in it looks like anatomy.
    """
    from scipy import ndimage

    from .masks import coarse_stride

    data = np.asarray(data, dtype=np.float32)
    keep = np.clip(np.asarray(keep, dtype=np.float32), 0.0, 1.0)
    stride = coarse_stride(voxel_sizes, FILL_GRID_MM)
    small = tuple(slice(None, None, s) for s in stride)
    coarse_mm = np.asarray(voxel_sizes, dtype=float) * np.asarray(stride)
    weight = keep[small].astype(np.float64)
    values = data[small] * weight
    fill = None
    for scale in reversed(FILL_SCALES_MM):  # coarse to fine
        sigma = scale / coarse_mm
        den = ndimage.gaussian_filter(weight, sigma, mode='constant')
        est = ndimage.gaussian_filter(values, sigma, mode='constant') / np.maximum(den, 1e-6)
        # trust this scale where its kernel holds at least half a kernel of tissue
        trust = np.clip(2 * den, 0.0, 1.0)
        fill = est if fill is None else trust * est + (1 - trust) * fill
    out = data.copy()
    where = np.nonzero(keep < 1)
    coords = np.stack(where).astype(np.float64) / np.asarray(stride, dtype=float)[:, None]
    filled = ndimage.map_coordinates(fill, coords, order=1, mode='nearest')
    out[where] = keep[where] * data[where] + (1 - keep[where]) * filled
    return out


def intensity_limits(volume: torch.Tensor, upper_percentile: float = 99.9) -> list:
    """Per item of ``volume`` (B, C, ...), the ``(low, high)`` that :func:`normalize_intensity`
    maps to 0 and 1: the minimum, and the percentile of the voxels above it (estimated on at
    most about one million of them); None for an item that is one value throughout."""
    out = []
    for b in range(volume.shape[0]):
        x = volume[b]
        lo = x.min()
        fg = x[x > lo]
        if fg.numel() == 0:
            out.append(None)
            continue
        if fg.numel() > 1_000_000:
            fg = fg[:: fg.numel() // 1_000_000 + 1]
        hi = torch.quantile(fg.float(), upper_percentile / 100)
        if hi <= lo:
            hi = fg.max()
        out.append((float(lo), float(hi)))
    return out


def normalize_intensity(volume: torch.Tensor, upper_percentile: float = 99.9,
                        limits: list | None = None) -> torch.Tensor:
    """Scale ``volume`` (B, C, ...) to [0, 1] per item: minimum -> 0, the percentile -> 1, clip.

    The percentile is taken over voxels above the minimum (background excluded), estimated on
    at most about one million of them. ``limits`` (from :func:`intensity_limits`) gives the
    two values instead: to scale part of an image as the whole of it would be.
    """
    if limits is None:
        limits = intensity_limits(volume, upper_percentile)
    out = torch.empty_like(volume)
    for b, lim in enumerate(limits):
        if lim is None:
            out[b] = 0
            continue
        lo, hi = lim
        out[b] = ((volume[b] - lo) / (hi - lo)).clamp(0, 1)
    return out
