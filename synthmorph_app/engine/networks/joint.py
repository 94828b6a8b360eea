"""Symmetric use of the deformable network, as ``HyperVxmJoint`` does.

``HyperVxmJoint`` (voxelmorph TF) runs the deformable network on both input orders and averages
the velocities before integration, ``v = (D(m, f) - D(f, m)) / 2``; ``exp(v)`` then maps the fixed
grid to the moving one and ``exp(-v)`` is its exact inverse.
"""

from __future__ import annotations

import torch

from .hyper import HyperUNet

__all__ = ['symmetric_velocity']


def symmetric_velocity(
    model: HyperUNet, moving: torch.Tensor, fixed: torch.Tensor, lam
) -> torch.Tensor:
    """``(D(moving, fixed) - D(fixed, moving)) / 2`` for a :class:`~.hyper.HyperUNet` ``D``.

    Both orders run as one batch of ``2 B``, so the hyper-convolution kernels are generated
    once. Inputs and output as in :meth:`HyperUNet.forward`: images ``(B, C, X, Y, Z)``, ``lam``
    ``(B, 1)`` (or a float); the velocity is ``(B, 3, X/2, Y/2, Z/2)`` in voxels of the
    half-resolution grid. Swapping ``moving`` and ``fixed`` negates the result exactly.
    """
    batch = moving.shape[0]
    lam = model._hyper_input(lam, batch, moving)
    both = model(torch.cat((moving, fixed)), torch.cat((fixed, moving)), torch.cat((lam, lam)))
    v_mf, v_fm = both.split(batch)
    return 0.5 * (v_mf - v_fm)
