"""Deformable registration: the hypernetwork U-Net of SynthMorph (``HyperVxmJoint``).

``HyperUNet.forward(source, target, lam)`` takes two ``(B, C, X, Y, Z)`` images in [0, 1] on the
same network grid (the moving image as ``source``, the fixed one as ``target``, as in
``HyperVxmJoint``, which concatenates them in that order) and the regularisation weight ``lam``
``(B, 1)`` in [0, 1]. It returns a stationary velocity field ``(B, 3, X/2, Y/2, Z/2)`` on the
*half-resolution* grid, in voxel units of that grid; channel ``c`` is the component along array
axis ``c``. Integrate it with ``spatial.integrate_svf`` (scaling and squaring in voxel units)
and bring it to the full grid.

The half-resolution grid: voxel ``i`` of it sits at full-grid voxel ``2 i`` for
``downsample='subsample'`` (the official model: voxelmorph samples the input at ``2 i`` and its
``RescaleTransform``/``scale(2)`` compositions assume the same correspondence) and at
``2 i + 0.5`` for ``'average'`` (2x2x2 block means); :meth:`HyperUNet.half_to_full` gives the
matrix. This differs from an ``align_corners=True`` resize, which maps ``i`` to
``i * (X - 1) / (X/2 - 1)``.

``X, Y, Z`` must be divisible by ``model.multiple = 2 * 2**len(enc)``.

``cost_volume = R > 0`` (ours, not in SynthMorph) adds ``(2R + 1)**3`` input channels to the
U-Net: for each offset ``o`` of the half-resolution grid within ``R`` voxels, how well the
target's MIND-SSC descriptors at ``x`` match the source's at ``x + o``, standardised over the
offsets at each voxel. Trained from scratch, the published U-Net's expected gradient is nearly
zero on fresh synthetic pairs (its untrained features do not tell which way the images moved;
``docs/model_cards.md``, session 7), and CPU training never got past that; the cost volume
carries that direction from the first step, as optical-flow networks' correlation layers do.
MIND keeps it contrast-independent. The key is absent from ``config`` when ``R = 0``, so the
configs of models without it stay as they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .blocks import (
    HyperConv,
    HyperMLP,
    UNetCore,
    check_pair,
    cost_offsets,
    downsample,
    mind_cost_volume,
)

__all__ = ['HyperUNet']


class HyperUNet(nn.Module):
    """U-Net whose convolution kernels come from a hypernetwork fed the weight ``lam``.

    ``lam`` (B, 1) -> :class:`~.blocks.HyperMLP` (``hyper_units``, ``hyper_activation`` after
    each layer) -> ``h``; every convolution of the U-Net is a :class:`~.blocks.HyperConv`,
    whose kernel and bias are linear in ``h``. The U-Net (:class:`~.blocks.UNetCore`) runs on
    the half-resolution pair: ``enc`` levels of conv + LeakyReLU(0.2) + max-pool, ``dec``
    levels of conv + LeakyReLU + upsample + skip concatenation, ``add`` convolutions, and a last
    hyper-convolution to 3 channels, initialised near zero (``final_init_std``) so an untrained
    model predicts almost no motion.

    Parameters
    ----------
    in_channels : int
        Channels of each image.
    enc, dec, add : sequences of int
        Channels of the levels (official ``synthmorph.deform.3.h5``: 4 x 256 each);
        ``len(dec) == len(enc)``.
    hyper_units : sequence of int
        Units of the hypernetwork's dense layers (official: 4 x 32). The parameter count of
        every hyper-convolution is ``(hyper_units[-1] + 1)`` times that of a plain one.
    hyper_activation : {'relu', 'leaky_relu', 'elu'}
        Activation after each dense layer (official: ReLU).
    hyper_inputs : int
        Number of hyperparameters (1: ``lam``).
    downsample : {'average', 'subsample'}
        How the input is halved (official: ``'subsample'``).
    final_init_std : float
        Standard deviation of the last layer's hyper weights at initialisation.
    cost_volume : int
        Radius ``R`` (half-resolution voxels) of the MIND cost volume fed to the U-Net beside
        the two images (module docstring); 0 (default): none, the published architecture.
    hidden_init : {'he', 'torch'}
        Initialisation of the U-Net's hyper-convolutions (:class:`~.blocks.HyperConv`
        ``init``). ``'he'`` keeps the signal's scale through the layers; ``'torch'``
        (``nn.Conv3d``'s default, our models before session 5) shrank its input-dependent
        part 5- to 8-fold from the first convolution to the last (He: none), and the untrained
        network's gradients 37-fold (median over parameters, on a synthetic training pair).
        Only the start of training depends on it.
    """

    def __init__(
        self,
        in_channels: int = 1,
        enc: Sequence[int] = (16, 16, 16, 16),
        dec: Sequence[int] = (16, 16, 16, 16),
        add: Sequence[int] = (16, 16),
        hyper_units: Sequence[int] = (32, 32, 32, 8),
        hyper_activation: str = 'relu',
        hyper_inputs: int = 1,
        downsample: str = 'average',
        final_init_std: float = 1e-5,
        hidden_init: str = 'he',
        cost_volume: int = 0,
    ):
        super().__init__()
        if len(dec) != len(enc):
            raise ValueError(
                f'need as many decoder as encoder levels, got {len(dec)} and {len(enc)}'
            )
        if downsample not in ('average', 'subsample'):
            raise ValueError(f"downsample must be 'average' or 'subsample', got {downsample!r}")
        if not hyper_units:
            raise ValueError('hyper_units must list at least one dense layer')
        radius = int(cost_volume)
        self.offsets = cost_offsets(radius)
        self.config = {
            'arch': 'HyperUNet',
            'in_channels': int(in_channels),
            'enc': [int(n) for n in enc],
            'dec': [int(n) for n in dec],
            'add': [int(n) for n in add],
            'hyper_units': [int(n) for n in hyper_units],
            'hyper_activation': hyper_activation,
            'hyper_inputs': int(hyper_inputs),
            'downsample': downsample,
            'final_init_std': float(final_init_std),
            'hidden_init': hidden_init,
        }
        if radius:
            self.config['cost_volume'] = radius
        hyper_dim = int(hyper_units[-1])
        self.hyper = HyperMLP(hyper_inputs, hyper_units, hyper_activation)
        self.core = UNetCore(
            2 * in_channels + len(self.offsets), enc, dec, add,
            make_conv=lambda i, o: HyperConv(hyper_dim, i, o, init=hidden_init),
        )
        self.flow = HyperConv(hyper_dim, self.core.out_channels, 3, init_std=final_init_std)
        self.multiple = 2 * self.core.multiple

    def half_to_full(self) -> np.ndarray:
        """4x4 matrix from half-resolution voxel indices to full-resolution voxel indices."""
        offset = 0.0 if self.config['downsample'] == 'subsample' else 0.5
        return np.array([[2, 0, 0, offset], [0, 2, 0, offset], [0, 0, 2, offset], [0, 0, 0, 1.0]])

    def _hyper_input(self, lam, batch: int, like: torch.Tensor) -> torch.Tensor:
        n = self.config['hyper_inputs']
        lam = torch.as_tensor(lam, dtype=like.dtype, device=like.device)
        if lam.ndim == 0:
            lam = lam.expand(batch, n)
        elif lam.ndim == 1 and n == 1:
            lam = lam[:, None]
        if lam.ndim == 1 and lam.shape[0] == n:
            lam = lam[None].expand(batch, n)
        if lam.shape != (batch, n):
            raise ValueError(f'lam must be ({batch}, {n}), got shape {tuple(lam.shape)}')
        if not torch.all((lam >= 0) & (lam <= 1)):
            raise ValueError(f'lam must lie in [0, 1], got {lam.flatten().tolist()}')
        return lam

    def forward(self, source: torch.Tensor, target: torch.Tensor, lam) -> torch.Tensor:
        """Velocity (B, 3, X/2, Y/2, Z/2), voxels of the half-resolution grid.

        ``lam`` is a (B, 1) tensor; a float or a (B,) tensor is accepted too.
        """
        check_pair(source, target, self.config['in_channels'], self.multiple,
                   names=('source', 'target'))  # fmt: skip
        h = self.hyper(self._hyper_input(lam, source.shape[0], source))
        x = downsample(torch.cat((source, target), 1), self.config['downsample'])
        if self.offsets:
            x = torch.cat((x, self.cost(x)), 1)
        return self.flow(self.core(x, h), h)

    def cost(self, pair: torch.Tensor) -> torch.Tensor:
        """The cost volume ``(B, (2R+1)**3, ...)`` of a half-resolution pair ``(B, 2C, ...)``
        (:func:`~.blocks.mind_cost_volume`)."""
        return mind_cost_volume(pair, self.config['in_channels'], self.offsets)
