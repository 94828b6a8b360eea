"""Affine and rigid registration networks (SynthMorph's three architectures).

Every model's ``forward(moving, fixed)`` takes two ``(B, C, X, Y, Z)`` float32 images in [0, 1] on
the *same* network grid shape (each grid centred on its own image, same voxel size) and returns a
``(B, 4, 4)`` matrix ``M`` in **voxel coordinates**: ``M @ [i, j, k, 1]`` maps a zero-based voxel
index of the fixed network grid to the voxel index of the moving network grid that it
corresponds to (the pulling direction: ``moved(i) = moving(M i)``). Internally the fits run in a
frame centred on the grid (:func:`~.fit.centred_to_voxel`).

``X, Y, Z`` must be divisible by ``model.multiple`` (2 for the optional half-resolution input
times 2 per encoder level); otherwise ``forward`` raises ValueError.

Architectures (Hoffmann et al., SPIE 2023 / Imaging Neuroscience 2024):

* :class:`AffineDetector` (the default, the official ``synthmorph.affine.2.h5`` /
  ``synthmorph.rigid.1.h5``): a shared conv net turns each image into K non-negative feature
  maps; channel barycentres are corresponding points, weighted by channel power; fits in both
  directions are combined symmetrically.
* :class:`AffineEncoder`: a conv encoder on the image pair regresses transform parameters.
* :class:`AffineDecomposer`: a U-Net predicts a dense displacement and per-voxel weights; a
  weighted least-squares fit turns them into one matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import UNetCore, check_pair, cost_offsets, downsample, init_convs, mind_cost_volume
from .fit import (
    barycenters,
    centred_to_voxel,
    channel_weights,
    decompose_rigid,
    fit_affine,
    fit_rigid,
    matrix_exp,
    symmetrize,
)

__all__ = ['AffineDecomposer', 'AffineDetector', 'AffineEncoder']

_ACTIVATIONS = {'relu': F.relu, 'softplus': F.softplus}


def _factor(mode: str | None) -> int:
    """Resolution factor of the input halving ``mode`` (see :func:`~.blocks.downsample`)."""
    if mode not in (None, 'average', 'subsample'):
        raise ValueError(f"downsample must be 'average', 'subsample' or None, got {mode!r}")
    return 1 if mode is None else 2


class AffineDetector(nn.Module):
    """Feature-detector affine/rigid network (voxelmorph's ``VxmAffineFeatureDetector``).

    Both images go through the same network: optional halving of the resolution, a
    :class:`~.blocks.UNetCore` (``enc`` levels of conv + max-pool, optional ``dec`` levels, ``add``
    convolutions at the coarsest level), and a final conv to ``num_features`` maps made
    non-negative by ``feature_activation``. Channel ``k``'s barycentre in the fixed image and in
    the moving image form one point pair (:func:`~.fit.barycenters`), weighted by the product
    of the channel's share of the total power in each image (:func:`~.fit.channel_weights`).

    Affine: weighted least-squares fits fixed->moving (``F``) and moving->fixed (``B``),
    combined by :func:`~.fit.symmetrize` (``'log'``: ``exp((log F - log B) / 2)``, exactly
    inverse-consistent and the identity for identical inputs; ``'mean'``: ``(F + B^-1) / 2``,
    the official model). Rigid (``rigid=True``): ``rigid_method='kabsch'`` fits a proper
    rotation and shift directly (weighted Kabsch, symmetric by construction);
    ``'decompose'`` symmetrises the affine fits, then drops scale and shear as the official
    ``synthmorph.rigid.1.h5`` does (:func:`~.fit.decompose_rigid`).

    Parameters
    ----------
    in_channels : int
        Channels of each image.
    enc, dec, add : sequences of int
        Channels of the encoder, decoder and extra convolutions (official: 4 x 256, none,
        4 x 256).
    num_features : int
        Number of feature maps = point pairs (official: 64).
    downsample : {'average', 'subsample', None}
        Halve the input resolution first (official: ``'subsample'``).
    feature_activation : {'relu', 'softplus'}
        Makes the feature maps non-negative (official: ReLU).
    rigid : bool
        Constrain the output to rotation and shift.
    rigid_method : {'kabsch', 'decompose'}
        How to make it rigid (see above; official: ``'decompose'``).
    symmetrize : {'log', 'mean'}
        How to combine the two affine fits (official: ``'mean'``).
    ridge : float
        Pull of degenerate fits towards the identity (:func:`~.fit.fit_affine`).
    init : {'he', 'torch'}
        Start of the convolutions (:func:`~.blocks.init_convs`). With ``'torch'`` (our models
        before session 5) the feature maps' spatial variation started 24 times smaller than
        after the first convolution, so every barycentre sat near the grid's centre.
    """

    def __init__(
        self,
        in_channels: int = 1,
        enc: Sequence[int] = (16, 32, 64),
        dec: Sequence[int] = (),
        add: Sequence[int] = (64, 64),
        num_features: int = 64,
        downsample: str | None = 'average',
        feature_activation: str = 'relu',
        rigid: bool = False,
        rigid_method: str = 'kabsch',
        symmetrize: str = 'log',
        ridge: float = 1e-3,
        init: str = 'he',
    ):
        super().__init__()
        if feature_activation not in _ACTIVATIONS:
            raise ValueError(f'feature_activation must be one of {sorted(_ACTIVATIONS)}')
        if rigid_method not in ('kabsch', 'decompose'):
            raise ValueError(f"rigid_method must be 'kabsch' or 'decompose', got {rigid_method!r}")
        if symmetrize not in ('log', 'mean'):
            raise ValueError(f"symmetrize must be 'log' or 'mean', got {symmetrize!r}")
        _factor(downsample)
        self.config = {
            'arch': 'AffineDetector',
            'in_channels': int(in_channels),
            'enc': [int(n) for n in enc],
            'dec': [int(n) for n in dec],
            'add': [int(n) for n in add],
            'num_features': int(num_features),
            'downsample': downsample,
            'feature_activation': feature_activation,
            'rigid': bool(rigid),
            'rigid_method': rigid_method,
            'symmetrize': symmetrize,
            'ridge': float(ridge),
            'init': init,
        }
        self.core = UNetCore(in_channels, enc, dec, add)
        self.head = nn.Conv3d(self.core.out_channels, num_features, kernel_size=3, padding=1)
        init_convs(self, init)
        self.multiple = _factor(downsample) * self.core.multiple

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Non-negative feature maps (B, K, x, y, z) of one batch of images."""
        x = downsample(image, self.config['downsample'])
        x = self.head(self.core(x))
        return _ACTIVATIONS[self.config['feature_activation']](x)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Voxel matrix (B, 4, 4) from fixed grid indices to moving grid indices."""
        cfg = self.config
        check_pair(moving, fixed, cfg['in_channels'], self.multiple)
        shape = moving.shape[2:]
        feat = self.features(torch.cat((moving, fixed)))
        feat_m, feat_f = feat.chunk(2)
        cen_m, mass_m = barycenters(feat_m, shape)
        cen_f, mass_f = barycenters(feat_f, shape)
        weights = channel_weights(mass_m, mass_f)
        if cfg['rigid'] and cfg['rigid_method'] == 'kabsch':
            matrix = fit_rigid(cen_f, cen_m, weights)
        else:
            fwd = fit_affine(cen_f, cen_m, weights, cfg['ridge'])
            bwd = fit_affine(cen_m, cen_f, weights, cfg['ridge'])
            matrix = symmetrize(fwd, bwd, cfg['symmetrize'])
            if cfg['rigid']:
                matrix = decompose_rigid(matrix)
        return centred_to_voxel(matrix, shape)


def _algebra(params: torch.Tensor, rigid: bool, scale: float) -> torch.Tensor:
    """4x4 Lie-algebra matrices from 12 (affine) or 6 (rigid) parameters per batch element.

    Affine: ``[[P, t], [0, 0]]`` with ``P`` the first 9 parameters (row-major) and ``t`` the
    last 3 times ``scale``. Rigid: ``[[skew(w), t], [0, 0]]`` with the rotation vector ``w``
    (radians) and ``t`` times ``scale``.
    """
    out = params.new_zeros(params.shape[0], 4, 4)
    if rigid:
        w = params[:, :3]
        zero = torch.zeros_like(w[:, 0])
        skew = torch.stack(
            (zero, -w[:, 2], w[:, 1], w[:, 2], zero, -w[:, 0], -w[:, 1], w[:, 0], zero), dim=1
        ).view(-1, 3, 3)
        out[:, :3, :3] = skew
        out[:, :3, 3] = params[:, 3:6] * scale
    else:
        out[:, :3, :3] = params[:, :9].view(-1, 3, 3)
        out[:, :3, 3] = params[:, 9:12] * scale
    return out


class AffineEncoder(nn.Module):
    """Parameter-encoder affine/rigid network.

    The concatenated pair (moving, fixed) goes through conv + LeakyReLU + max-pool levels, an
    average over each cell of a ``pool_grid``^3 grid, and a linear layer from the flattened cells
    to 12 parameters (6 if ``rigid``), initialised to zero.
    They are read as an element ``L`` of the Lie algebra of affine (rigid) transforms in the
    centred frame: ``P`` (3x3) and a shift in units of half the largest grid size (rigid: a
    rotation vector in radians and the shift); see ``_algebra``. With ``symmetric=True`` the
    network also runs on (fixed, moving) and the output is ``exp((L(m, f) - L(f, m)) / 2)``:
    inverse-consistent by construction, the identity for identical inputs, and a proper
    rotation when rigid. The zero initialisation makes the untrained model return the identity.

    Parameters
    ----------
    in_channels : int
        Channels of each image.
    enc : sequence of int
        Channels of the encoder levels.
    rigid : bool
        6 parameters (rotation + shift) instead of 12.
    symmetric : bool
        Antisymmetrise over the input order (above).
    downsample : {'average', 'subsample', None}
        Halve the input resolution first.
    pool_grid : int
        Cells per axis of the final average pooling, flattened into the linear layer. With 1 (a
        global average, the default of the runs of sessions 6-15) the features lose where they
        lie in the image, so the parameters of a rotation or a scaling, whose displacement
        changes sign across the brain, cannot be read from them. 4 keeps a coarse layout, as the
        paper's encoder keeps its flattened feature map.
    """

    def __init__(
        self,
        in_channels: int = 1,
        enc: Sequence[int] = (16, 32, 32, 32),
        rigid: bool = False,
        symmetric: bool = True,
        downsample: str | None = 'average',
        pool_grid: int = 1,
    ):
        super().__init__()
        _factor(downsample)
        self.config = {
            'arch': 'AffineEncoder',
            'in_channels': int(in_channels),
            'enc': [int(n) for n in enc],
            'rigid': bool(rigid),
            'symmetric': bool(symmetric),
            'downsample': downsample,
        }
        cells = int(pool_grid)
        if cells < 1:
            raise ValueError(f'pool_grid must be at least 1, got {pool_grid!r}')
        if cells != 1:  # absent from the configs of earlier (global average) models
            self.config['pool_grid'] = cells
        self.pool = nn.AdaptiveAvgPool3d(cells)
        self.core = UNetCore(2 * in_channels, enc, (), ())
        self.head = nn.Linear(self.core.out_channels * cells**3, 6 if rigid else 12)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.multiple = _factor(downsample) * self.core.multiple

    def _params(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        x = downsample(torch.cat((moving, fixed), 1), self.config['downsample'])
        return self.head(self.pool(self.core(x)).flatten(1))

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Voxel matrix (B, 4, 4) from fixed grid indices to moving grid indices."""
        cfg = self.config
        check_pair(moving, fixed, cfg['in_channels'], self.multiple)
        shape = moving.shape[2:]
        scale = max(shape) / 2
        if cfg['symmetric']:
            both = self._params(torch.cat((moving, fixed)), torch.cat((fixed, moving)))
            p_mf, p_fm = both.chunk(2)
            alg = 0.5 * (_algebra(p_mf, cfg['rigid'], scale) - _algebra(p_fm, cfg['rigid'], scale))
        else:
            alg = _algebra(self._params(moving, fixed), cfg['rigid'], scale)
        return centred_to_voxel(matrix_exp(alg), shape)


class AffineDecomposer(nn.Module):
    """Warp-decomposer affine/rigid network.

    A U-Net (:class:`~.blocks.UNetCore`) on the concatenated pair predicts, at its output
    resolution, a displacement ``u`` (3 channels, voxels of the full grid, initialised near zero)
    and a weight ``softplus(s)`` (1 channel) for every output voxel ``x``: fixed point ``x``
    corresponds to moving point ``x + u(x)``. Output voxel ``i`` of ``n`` represents the full-grid
    block centred on ``(i - (n - 1) / 2) * X / n`` (centred frame). A weighted least-squares
    fit (rigid: weighted Kabsch) of these pairs gives the fixed->moving matrix; the network
    also runs on (fixed, moving), and the two fits are combined by :func:`~.fit.symmetrize`
    (``'log'``), which keeps rigid fits rigid.

    ``cost_volume = R > 0`` adds a MIND cost volume of radius ``R`` to the U-Net's input, as for
    the deformable network (:func:`~.blocks.mind_cost_volume`; ours, not the paper's): a dense
    displacement U-Net trained from scratch on CPU otherwise stays at the zero field
    (``docs/model_cards.md``). The key is absent from ``config`` when ``R = 0``.

    Parameters
    ----------
    in_channels : int
        Channels of each image.
    enc, dec, add : sequences of int
        U-Net channels.
    rigid : bool
        Fit rotation and shift only.
    downsample : {'average', 'subsample', None}
        Halve the input resolution first.
    ridge : float
        Pull of degenerate affine fits towards the identity.
    cost_volume : int
        Radius of the MIND cost volume input (0: none).
    """

    def __init__(
        self,
        in_channels: int = 1,
        enc: Sequence[int] = (16, 32, 32, 32),
        dec: Sequence[int] = (32, 32, 32),
        add: Sequence[int] = (16,),
        rigid: bool = False,
        downsample: str | None = 'average',
        ridge: float = 1e-3,
        cost_volume: int = 0,
    ):
        super().__init__()
        _factor(downsample)
        self.config = {
            'arch': 'AffineDecomposer',
            'in_channels': int(in_channels),
            'enc': [int(n) for n in enc],
            'dec': [int(n) for n in dec],
            'add': [int(n) for n in add],
            'rigid': bool(rigid),
            'downsample': downsample,
            'ridge': float(ridge),
        }
        self.offsets = cost_offsets(cost_volume)
        if self.offsets:
            self.config['cost_volume'] = int(cost_volume)
        self.core = UNetCore(2 * in_channels + len(self.offsets), enc, dec, add)
        self.head = nn.Conv3d(self.core.out_channels, 4, kernel_size=3, padding=1)
        with torch.no_grad():
            nn.init.normal_(self.head.weight, 0.0, 1e-5)
            nn.init.zeros_(self.head.bias)
        self.multiple = _factor(downsample) * self.core.multiple

    def _fit(self, moving: torch.Tensor, fixed: torch.Tensor, shape) -> torch.Tensor:
        x = downsample(torch.cat((moving, fixed), 1), self.config['downsample'])
        if self.offsets:
            x = torch.cat((x, mind_cost_volume(x, self.config['in_channels'], self.offsets)), 1)
        out = self.head(self.core(x))
        disp, weight = out[:, :3], F.softplus(out[:, 3])
        axes = []
        for n, full in zip(out.shape[2:], shape):
            coord = torch.arange(n, dtype=out.dtype, device=out.device)
            axes.append((coord - (n - 1) / 2) * (float(full) / n))
        grid = torch.stack(torch.meshgrid(*axes, indexing='ij'))  # (3, x, y, z)
        src = grid.reshape(3, -1).T.expand(out.shape[0], -1, -1)
        dst = src + disp.flatten(2).transpose(1, 2)
        w = weight.flatten(1)
        if self.config['rigid']:
            return fit_rigid(src, dst, w)
        return fit_affine(src, dst, w, self.config['ridge'])

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Voxel matrix (B, 4, 4) from fixed grid indices to moving grid indices."""
        check_pair(moving, fixed, self.config['in_channels'], self.multiple)
        shape = moving.shape[2:]
        both = self._fit(torch.cat((moving, fixed)), torch.cat((fixed, moving)), shape)
        fwd, bwd = both.chunk(2)
        return centred_to_voxel(symmetrize(fwd, bwd, 'log'), shape)
