"""Building blocks of the networks: convolutions, hyper-convolutions, the U-Net core.

Conventions
-----------
* Volumes are ``(B, C, X, Y, Z)``; every convolution is 3x3x3 with zero padding 1 (Keras
  ``padding='same'``), stride 1, followed by LeakyReLU(0.2) inside the U-Net core, as in
  voxelmorph's SynthMorph models.
* A layer of the core is called as ``layer(x, *cond)``: plain convolutions ignore ``cond``,
  hyper-convolutions take the hypernetwork output from it. One :class:`UNetCore` thus serves the
  plain and the hyper networks (blocks are composed, not switched by flags).

Why our own code: voxelmorph 0.3.4 (PyTorch) has a U-Net but no hyper-convolution, and its
layout (skip connections, layer order) differs from the TF models whose weights we load; here
the layer order is that of ``VxmAffineFeatureDetector`` and ``HyperVxmJoint`` (voxelmorph TF),
so Keras layers map one to one onto ours.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..similarity import mind_ssc, shift_volume

__all__ = [
    'Conv',
    'HyperConv',
    'HyperMLP',
    'UNetCore',
    'check_pair',
    'downsample',
]

#: Negative slope of every LeakyReLU, as in the SynthMorph models.
LEAKY_SLOPE = 0.2
#: Initialisations of :class:`HyperConv` and :func:`init_convs`.
HYPER_INITS = ('torch', 'he')


class Conv(nn.Conv3d):
    """3x3x3 convolution, zero padding 1; ``forward(x, *cond)`` ignores ``cond``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, *cond) -> torch.Tensor:
        return super().forward(x)


def init_convs(module: nn.Module, init: str) -> None:
    """Initialise every ``nn.Conv3d`` of ``module`` as ``init`` says (in place).

    ``'torch'`` keeps ``nn.Conv3d``'s default (variance ``1 / (3 fan_in)``: the signal shrinks by
    about 0.4 per convolution + LeakyReLU); ``'he'`` draws He's normal weights for
    LeakyReLU(0.2) with zero biases, which keeps the signal's scale through the layers.
    """
    if init not in HYPER_INITS:
        raise ValueError(f'init must be one of {HYPER_INITS}, got {init!r}')
    if init == 'torch':
        return
    for conv in module.modules():
        if isinstance(conv, nn.Conv3d):
            nn.init.kaiming_normal_(conv.weight, a=LEAKY_SLOPE, nonlinearity='leaky_relu')
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)


class HyperConv(nn.Module):
    """3x3x3 convolution whose kernel and bias are linear functions of a hyper vector.

    ``kernel = reshape(h @ W_k^T + b_k)`` and ``bias = h @ W_b^T + b_b`` for the hypernetwork
    output ``h`` (B, H), as neurite's ``HyperConvFromDense`` (``hyperkernel`` and ``hyperbias``
    dense maps, no activation). Each batch element gets its own kernel; elements with equal
    ``h`` share one convolution.

    Parameters
    ----------
    hyper_dim : int
        Size ``H`` of the hyper vector.
    in_channels, out_channels : int
        Channels of the convolution.
    init_std : float or None
        None: the generated kernels start as ``init`` says, varying with ``h``. A number:
        kernel and bias maps drawn from N(0, init_std) with zero offsets, for an output layer
        that starts near zero.
    init : {'torch', 'he'}
        Start of the generated kernels' constant part: ``'torch'``, ``nn.Conv3d``'s default
        (variance ``1 / (3 fan_in)``, which shrinks the signal by about 0.4 per convolution +
        LeakyReLU: 10 such layers leave the U-Net's output nearly blind to its input); ``'he'``,
        He's normal initialisation for LeakyReLU(0.2) (variance ``2 / (1.04 fan_in)``, zero
        bias), which keeps the signal's scale through the layers.

    Attributes
    ----------
    kernel_map : nn.Linear
        ``H -> out * in * 27``; output reshaped to ``(out, in, 3, 3, 3)`` (torch order).
    bias_map : nn.Linear
        ``H -> out``.
    """

    def __init__(
        self,
        hyper_dim: int,
        in_channels: int,
        out_channels: int,
        init_std: float | None = None,
        init: str = 'torch',
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_map = nn.Linear(hyper_dim, out_channels * in_channels * 27)
        self.bias_map = nn.Linear(hyper_dim, out_channels)
        if init not in HYPER_INITS:
            raise ValueError(f'init must be one of {HYPER_INITS}, got {init!r}')
        with torch.no_grad():
            if init_std is None:
                fan_in = in_channels * 27
                bound = 1 / math.sqrt(fan_in)
                if init == 'he':
                    std = math.sqrt(2 / (1 + LEAKY_SLOPE**2) / fan_in)
                    nn.init.normal_(self.kernel_map.bias, 0.0, std)
                    nn.init.zeros_(self.bias_map.bias)
                else:
                    # the constant part: nn.Conv3d's default kernel and bias
                    nn.init.uniform_(self.kernel_map.bias, -bound, bound)
                    nn.init.uniform_(self.bias_map.bias, -bound, bound)
                # the h-dependent part: a fraction of that, spread over the H inputs
                nn.init.uniform_(self.kernel_map.weight, -bound / hyper_dim, bound / hyper_dim)
                nn.init.uniform_(self.bias_map.weight, -bound / hyper_dim, bound / hyper_dim)
            else:
                for lin in (self.kernel_map, self.bias_map):
                    nn.init.normal_(lin.weight, 0.0, init_std)
                    nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` (B, in, X, Y, Z) with the kernels generated from ``h`` (B, H)."""
        batch = x.shape[0]
        if h.shape[0] != batch:
            raise ValueError(f'hyper vector batch {h.shape[0]} does not match input batch {batch}')
        shape = (self.out_channels, self.in_channels, 3, 3, 3)
        if batch == 1 or torch.equal(h, h[:1].expand_as(h)):
            kernel = self.kernel_map(h[:1]).view(shape)
            return F.conv3d(x, kernel, self.bias_map(h[0]), padding=1)
        kernel = self.kernel_map(h).view(batch * shape[0], *shape[1:])
        out = F.conv3d(x.reshape(1, -1, *x.shape[2:]), kernel, self.bias_map(h).reshape(-1),
                       padding=1, groups=batch)  # fmt: skip
        return out.view(batch, self.out_channels, *out.shape[2:])


class HyperMLP(nn.Sequential):
    """The hypernetwork: dense layers, each followed by ``activation``.

    ``HyperVxmJoint`` (voxelmorph TF) uses four 32-unit layers, all with ReLU.
    """

    def __init__(self, in_features: int, units: Sequence[int], activation: str = 'relu'):
        acts = {'relu': nn.ReLU, 'leaky_relu': lambda: nn.LeakyReLU(LEAKY_SLOPE), 'elu': nn.ELU}
        if activation not in acts:
            raise ValueError(f'activation must be one of {sorted(acts)}, got {activation!r}')
        layers = []
        for n in units:
            layers += [nn.Linear(in_features, n), acts[activation]()]
            in_features = n
        super().__init__(*layers)


class UNetCore(nn.Module):
    """Encoder, decoder with skip connections, and extra convolutions at the end.

    As ``HyperVxmJoint`` and ``VxmAffineFeatureDetector`` (voxelmorph TF): for each encoder level a
    convolution, LeakyReLU, store the skip, max-pool by 2; for each decoder level a
    convolution, LeakyReLU, nearest upsampling by 2, concatenation ``[upsampled, skip]``
    (deepest skip first); then the extra convolutions, each with LeakyReLU. The output has
    ``add[-1]`` channels (or the last decoder/encoder level's), at ``1 / 2**(len(enc) -
    len(dec))`` of the input resolution.

    Parameters
    ----------
    in_channels : int
        Input channels.
    enc, dec, add : sequences of int
        Output channels of the encoder, decoder and extra convolutions. ``len(dec) <=
        len(enc)``.
    make_conv : callable ``(in_channels, out_channels) -> nn.Module``
        Builds each convolution; called as ``layer(x, *cond)``.
    """

    def __init__(
        self,
        in_channels: int,
        enc: Sequence[int],
        dec: Sequence[int],
        add: Sequence[int],
        make_conv: Callable[[int, int], nn.Module] = Conv,
    ):
        super().__init__()
        if len(dec) > len(enc):
            raise ValueError(f'more decoder levels ({len(dec)}) than encoder levels ({len(enc)})')
        self.enc = nn.ModuleList()
        self.dec = nn.ModuleList()
        self.add = nn.ModuleList()
        skips = []
        ch = in_channels
        for n in enc:
            self.enc.append(make_conv(ch, n))
            ch = n
            skips.append(n)
        for n in dec:
            self.dec.append(make_conv(ch, n))
            ch = n + skips.pop()
        for n in add:
            self.add.append(make_conv(ch, n))
            ch = n
        self.out_channels = ch
        self.levels = len(enc)
        #: input size factor needed: every pooling halves the grid.
        self.multiple = 2 ** len(enc)

    def forward(self, x: torch.Tensor, *cond) -> torch.Tensor:
        """Run the core on ``x`` (B, C, X, Y, Z); ``cond`` goes to every layer."""
        skips = []
        for conv in self.enc:
            x = F.leaky_relu(conv(x, *cond), LEAKY_SLOPE)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        for conv in self.dec:
            x = F.leaky_relu(conv(x, *cond), LEAKY_SLOPE)
            x = torch.cat((F.interpolate(x, scale_factor=2, mode='nearest'), skips.pop()), 1)
        for conv in self.add:
            x = F.leaky_relu(conv(x, *cond), LEAKY_SLOPE)
        return x


def downsample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    """Halve the resolution of ``x`` (B, C, X, Y, Z).

    ``'subsample'`` keeps the even voxels (voxel ``i`` of the result is voxel ``2 i``), as
    the official models do (voxelmorph samples at ``2 i`` with a scaling transform);
    ``'average'`` averages 2x2x2 blocks (voxel ``i`` is centred on ``2 i + 0.5``), which
    aliases less; None returns ``x``.
    """
    if mode is None:
        return x
    if mode == 'subsample':
        return x[:, :, ::2, ::2, ::2]
    if mode == 'average':
        return F.avg_pool3d(x, 2)
    raise ValueError(f"downsample must be 'subsample', 'average' or None, got {mode!r}")


def check_pair(
    a: torch.Tensor, b: torch.Tensor, channels: int, multiple: int, names=('moving', 'fixed')
) -> None:
    """Raise ValueError unless ``a`` and ``b`` are (B, channels, X, Y, Z) alike, X, Y, Z
    divisible by ``multiple``."""
    for t, name in zip((a, b), names):
        if t.ndim != 5 or t.shape[1] != channels:
            raise ValueError(
                f'{name} must be (B, {channels}, X, Y, Z), got shape {tuple(t.shape)}'
            )
    if a.shape != b.shape:
        raise ValueError(
            f'{names[0]} and {names[1]} must have the same shape, got {tuple(a.shape)} and '
            f'{tuple(b.shape)}'
        )
    bad = [s for s in a.shape[2:] if s % multiple]
    if bad:
        raise ValueError(
            f'spatial shape {tuple(a.shape[2:])} must be divisible by {multiple} along every '
            f'axis (the network halves it that often); pad or crop the network grid'
        )


def cost_offsets(radius: int) -> list:
    """The ``(2R + 1)**3`` voxel offsets of a cost volume of radius ``R`` (none for 0)."""
    radius = int(radius)
    if radius < 0:
        raise ValueError(f'cost_volume must be 0 or a radius >= 1, got {radius}')
    span = range(-radius, radius + 1)
    return list(itertools.product(span, repeat=3)) if radius else []


def mind_cost_volume(pair: torch.Tensor, in_channels: int, offsets: Sequence) -> torch.Tensor:
    """The cost volume ``(B, len(offsets), ...)`` of a pair ``(B, 2C, ...)`` (source channels
    first): minus the mean squared difference of the target's MIND-SSC descriptors at ``x`` and
    the source's at ``x + o`` for each offset ``o``, standardised over the offsets at each voxel
    (flat regions give zeros). Ours, not SynthMorph's: it tells an untrained network which way
    the images moved, contrast-independently (:mod:`.hyper`)."""
    source = pair[:, :in_channels].mean(1, keepdim=True)
    target = pair[:, in_channels:].mean(1, keepdim=True)
    mind_s, mind_t = mind_ssc(source, 1, 1), mind_ssc(target, 1, 1)
    cost = torch.cat(
        [-((mind_t - shift_volume(mind_s, o)) ** 2).mean(1, keepdim=True) for o in offsets], 1
    )
    centred = cost - cost.mean(1, keepdim=True)
    return centred / (cost.std(1, keepdim=True) + 1e-6)
