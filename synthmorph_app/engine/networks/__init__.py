"""Registration networks: affine/rigid (three architectures) and the deformable hyper U-Net.

Every network takes its hyperparameters in ``__init__`` only and records them in
``model.config``, a JSON-able dict with the key ``'arch'``; :func:`build_model` rebuilds an
untrained network from it. Inputs are ``(B, C, X, Y, Z)`` float32 images in [0, 1] with ``X, Y, Z``
divisible by ``model.multiple``.

* affine/rigid: ``model(moving, fixed) -> (B, 4, 4)`` voxel matrix, fixed grid index -> moving
  grid index (:mod:`.affine`);
* deformable: ``model(source, target, lam) -> (B, 3, X/2, Y/2, Z/2)`` velocity in voxels of the
  half-resolution grid (:mod:`.hyper`); :func:`symmetric_velocity` for the symmetric use.
"""

from __future__ import annotations

import copy

from torch import nn

from .affine import AffineDecomposer, AffineDetector, AffineEncoder
from .hyper import HyperUNet
from .joint import symmetric_velocity

__all__ = [
    'ARCHITECTURES',
    'AffineDecomposer',
    'AffineDetector',
    'AffineEncoder',
    'HyperUNet',
    'build_model',
    'default_config',
    'model_kind',
    'symmetric_velocity',
]

#: Network classes by the ``'arch'`` of their config.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    'AffineDetector': AffineDetector,
    'AffineEncoder': AffineEncoder,
    'AffineDecomposer': AffineDecomposer,
    'HyperUNet': HyperUNet,
}

#: Our default (small, CPU-friendly) models by kind. The deformable one takes a MIND cost volume
#: (``cost_volume=1``, ours): without it the U-Net never learnt on CPU (docs/model_cards.md).
#: Its hypernetwork uses leaky ReLUs: with ReLUs (SynthMorph's choice) the trained network's
#: 8-unit last layer ended up all dead for lambda >= 0.5, so lambda stopped steering it there
#: and no gradient could revive the units (docs/model_cards.md, the deform card).
_DEFAULTS = {
    'affine': {'arch': 'AffineDetector'},
    'rigid': {'arch': 'AffineDetector', 'rigid': True},
    'deform': {'arch': 'HyperUNet', 'cost_volume': 1, 'hyper_activation': 'leaky_relu'},
}


def build_model(config: dict) -> nn.Module:
    """An untrained network from its ``config`` (``model.config`` of a network)."""
    if not isinstance(config, dict) or 'arch' not in config:
        raise ValueError(f"config must be a dict with an 'arch' key, got {config!r}")
    cfg = dict(config)
    arch = cfg.pop('arch')
    if arch not in ARCHITECTURES:
        raise ValueError(f'unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}')
    return ARCHITECTURES[arch](**cfg)


def default_config(kind: str) -> dict:
    """The full config of our default network for ``kind`` ('affine', 'rigid', 'deform')."""
    if kind not in _DEFAULTS:
        raise ValueError(f'kind must be one of {sorted(_DEFAULTS)}, got {kind!r}')
    return copy.deepcopy(build_model(_DEFAULTS[kind]).config)


def model_kind(config: dict) -> str:
    """'affine', 'rigid' or 'deform': what a network with ``config`` does."""
    arch = config.get('arch')
    if arch == 'HyperUNet':
        return 'deform'
    if arch in ARCHITECTURES:
        return 'rigid' if config.get('rigid') else 'affine'
    raise ValueError(f'unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}')
