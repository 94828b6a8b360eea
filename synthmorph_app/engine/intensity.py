"""Intensity normalisation of network inputs.

The networks are trained on synthetic images min-max normalised to [0, 1]; real images get the
same, made robust to a few very bright voxels (vessels, fat, artefacts) by using a high
percentile instead of the maximum.
"""

from __future__ import annotations

import torch


def normalize_intensity(volume: torch.Tensor, upper_percentile: float = 99.9) -> torch.Tensor:
    """Scale ``volume`` (B, C, ...) to [0, 1] per item: minimum -> 0, the percentile -> 1, clip.

    The percentile is taken over voxels above the minimum (background excluded), estimated on
    at most about one million of them.
    """
    out = torch.empty_like(volume)
    for b in range(volume.shape[0]):
        x = volume[b]
        lo = x.min()
        fg = x[x > lo]
        if fg.numel() == 0:
            out[b] = 0
            continue
        if fg.numel() > 1_000_000:
            fg = fg[:: fg.numel() // 1_000_000 + 1]
        hi = torch.quantile(fg.float(), upper_percentile / 100)
        if hi <= lo:
            hi = fg.max()
        out[b] = ((x - lo) / (hi - lo)).clamp(0, 1)
    return out
