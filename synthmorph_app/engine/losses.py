"""Anatomy-aware training losses of SynthMorph, and the label groups they use.

Conventions
-----------
* Segmentations given to the losses are *loss-channel maps*: ``(B, 1, X, Y, Z)`` integer
  tensors whose value ``k`` in ``1..K`` names the ``k``-th selected brain label and ``0`` every
  voxel the loss ignores (background, skull, neck, eyes, small or unreliable structures).
  :class:`LabelGroups` says which FreeSurfer labels are selected (a packaged table:
  ``synthmorph_app/data/labels/freesurfer_groups.tsv``), :func:`onehot` turns a channel map into
  ``(B, K, X, Y, Z)`` one-hot maps *without* a channel for 0, so ignored voxels are zero in
  every channel and cannot pull the alignment.
* Displacements are ``(B, 3, X, Y, Z)`` in voxel units of their grid; gradients are forward
  differences per voxel, so the smoothness term is dimensionless (a Jacobian deviation).
* Every loss returns one value per batch item, ``(B,)``; the caller averages.
* As in SynthMorph, the losses are computed on the half-resolution grid of the deformable
  network (:func:`half_to_full`, :func:`halve`): one-hot maps averaged over 2x2x2 blocks.

The losses follow voxelmorph's SynthMorph training scripts (``train_synthmorph_affine.py``,
``train_synthmorph_joint.py``): MSE between one-hot maps of the moved and fixed labels,
``loss_mult`` (10) times that for the deformable model, plus ``lambda`` times the L2 norm of the
displacement gradient. We use neurite's ``spatial_gradient`` for the smoothness term; the
overlap and warping helpers are ours because they need the loss-channel convention above and
two-grid affine sampling that voxelmorph 0.3.4 does not offer.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import neurite as ne
import torch
import torch.nn.functional as F

from . import spatial

__all__ = [
    'LabelGroups',
    'affine_warp',
    'apply_matrix',
    'deform_loss',
    'dice',
    'grad_l2',
    'half_to_full',
    'halve',
    'load_label_groups',
    'onehot',
    'overlap_dice',
    'overlap_mse',
]

#: Overlap terms by name (:class:`~.training.TrainConfig` ``overlap``).
OVERLAPS = ('mse', 'dice')

#: The packaged FreeSurfer label table (columns: label, name, loss, removable).
DEFAULT_LABEL_TABLE = 'freesurfer_groups.tsv'


@dataclass(frozen=True)
class LabelGroups:
    """Which labels of a label map count for the loss, and which synthesis may remove.

    Attributes
    ----------
    names : dict
        Label value -> name.
    loss : tuple of int
        Labels compared by the overlap loss, in channel order (channel ``k`` is ``loss[k-1]``).
    removable : tuple of int
        Non-brain labels (skull, scalp, neck, eyes, extra-cerebral CSF) that synthesis may blank
        out to mimic skull-stripped images. They never enter the loss.
    """

    names: dict
    loss: tuple
    removable: tuple

    @property
    def num_channels(self) -> int:
        """Number of loss channels ``K``."""
        return len(self.loss)

    def channel_lut(self, values) -> torch.Tensor:
        """Loss channel (0 = ignored, 1..K) of each label value in ``values`` (a long tensor)."""
        index = {label: k + 1 for k, label in enumerate(self.loss)}
        return torch.tensor([index.get(int(v), 0) for v in values], dtype=torch.long)

    def removable_mask(self, values) -> torch.Tensor:
        """Boolean tensor: is each label value in ``values`` removable."""
        removable = set(self.removable)
        return torch.tensor([int(v) in removable for v in values], dtype=torch.bool)


def load_label_groups(path: str | Path | None = None) -> LabelGroups:
    """Read a label table (TSV with columns ``label, name, loss, removable``; 0/1 flags).

    ``path`` defaults to the packaged FreeSurfer table. Labels not in the table are neither in
    the loss nor removable: they appear in the synthetic images and nowhere else.
    """
    if path is None:
        path = resources.files('synthmorph_app') / 'data' / 'labels' / DEFAULT_LABEL_TABLE
    names, loss, removable = {}, [], []
    with open(str(path), newline='') as fobj:
        reader = csv.DictReader(fobj, delimiter='\t')
        missing = {'label', 'name', 'loss', 'removable'} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f'label table <{path}> lacks the columns {sorted(missing)}')
        for row in reader:
            label = int(row['label'])
            names[label] = row['name']
            if int(row['loss']):
                loss.append(label)
            if int(row['removable']):
                removable.append(label)
    if 0 in loss or 0 in removable:
        raise ValueError(f'label table <{path}>: label 0 (background) cannot be in the loss')
    return LabelGroups(names=names, loss=tuple(loss), removable=tuple(removable))


def onehot(seg: torch.Tensor, num_channels: int, dtype=torch.float32) -> torch.Tensor:
    """One-hot maps ``(B, K, ...)`` of a loss-channel map ``seg`` ``(B, 1, ...)``.

    Channel 0 (ignored voxels) gets no map: those voxels are zero in every output channel.
    """
    if seg.ndim < 3 or seg.shape[1] != 1:
        raise ValueError(f'seg must be (B, 1, X, Y, Z), got shape {tuple(seg.shape)}')
    seg = seg.long()
    if int(seg.max()) > num_channels or int(seg.min()) < 0:
        raise ValueError(
            f'seg values must lie in [0, {num_channels}], got [{int(seg.min())}, {int(seg.max())}]'
        )
    full = ne.nn.functional.one_hot(seg, num_classes=num_channels + 1, dtype=dtype)
    return full[:, 1:]


def half_to_full(mode: str = 'average', device=None, dtype=torch.float32) -> torch.Tensor:
    """4x4 matrix from voxel indices of the half-resolution grid to the full grid.

    The deformable network's convention (:meth:`~.networks.HyperUNet.half_to_full`): half-grid
    voxel ``i`` is full-grid voxel ``2 i + 0.5`` for ``'average'`` (2x2x2 block means) and
    ``2 i`` for ``'subsample'``.
    """
    if mode not in ('average', 'subsample'):
        raise ValueError(f"mode must be 'average' or 'subsample', got {mode!r}")
    offset = 0.5 if mode == 'average' else 0.0
    mat = torch.tensor(
        [[2, 0, 0, offset], [0, 2, 0, offset], [0, 0, 2, offset], [0, 0, 0, 1]], dtype=torch.float64
    )
    return mat.to(device=device, dtype=dtype)


def halve(maps: torch.Tensor, mode: str = 'average') -> torch.Tensor:
    """Maps ``(B, K, X, Y, Z)`` on the half-resolution grid of :func:`half_to_full` ``(mode)``.

    ``'average'``: 2x2x2 block means (soft one-hot maps, partial volumes); ``'subsample'``:
    every other voxel. Odd sizes lose their last voxel.
    """
    if maps.ndim != 5:
        raise ValueError(f'maps must be (B, K, X, Y, Z), got shape {tuple(maps.shape)}')
    if mode == 'average':
        return F.avg_pool3d(maps, 2)
    if mode == 'subsample':
        x, y, z = (s // 2 for s in maps.shape[2:])
        return maps[:, :, : 2 * x : 2, : 2 * y : 2, : 2 * z : 2]
    raise ValueError(f"mode must be 'average' or 'subsample', got {mode!r}")


def apply_matrix(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply voxel matrices ``(B, 4, 4)`` to points ``(3, ...)`` or ``(B, 3, ...)``."""
    shape = points.shape[-4:] if points.ndim == 5 else points.shape
    flat = points.reshape(*points.shape[:-3], -1).to(matrix.dtype)
    out = matrix[:, :3, :3] @ flat + matrix[:, :3, 3:]
    return out.reshape(matrix.shape[0], *shape)


def affine_warp(
    maps: torch.Tensor, matrix: torch.Tensor, to_full: torch.Tensor | None = None
) -> torch.Tensor:
    """Pull ``maps`` ``(B, C, x, y, z)`` through voxel matrices ``matrix`` ``(B, 4, 4)``.

    ``matrix`` maps voxel indices of the fixed grid to voxel indices of the moving grid (the
    affine networks' output). When ``maps`` live on a coarser grid than the one ``matrix`` is
    expressed on, ``to_full`` (4x4, e.g. :func:`half_to_full`) maps their voxel indices to it,
    and the matrix acts as ``to_full^-1 @ matrix @ to_full``. Differentiable in ``matrix``;
    voxels that map outside the moving grid get 0.
    """
    if matrix.ndim != 3 or matrix.shape[1:] != (4, 4):
        raise ValueError(f'matrix must be (B, 4, 4), got shape {tuple(matrix.shape)}')
    if matrix.shape[0] != maps.shape[0]:
        raise ValueError(f'{maps.shape[0]} maps but {matrix.shape[0]} matrices')
    mat = matrix.to(maps.dtype)
    if to_full is not None:
        to_full = to_full.to(device=maps.device, dtype=maps.dtype)
        mat = torch.linalg.inv(to_full) @ mat @ to_full
    grid = spatial.identity_coords(maps.shape[2:], maps.device)
    return spatial.sample_grid(maps, apply_matrix(mat, grid), 'linear')


def overlap_mse(moved: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of one-hot maps ``(B, K, ...)``, per batch item ``(B,)``.

    Only the K selected labels have channels (see :func:`onehot`), so labels outside the loss
    cannot change this value.

    Computed as the mean of ``p (1 - q) + q (1 - p)`` (``p`` moved, ``q`` fixed): the MSE
    ``(p - q)^2`` itself wherever ``p`` is 0 or 1, but linear in ``p``. The moved map is pulled
    by linear interpolation, so it is soft wherever the field points between voxels, and the
    plain MSE rewards that blur (its ``p^2`` term shrinks): on held-out pairs at the 8 mm loss
    grid, a uniform shift of a quarter voxel lowered the plain MSE by 22 %, and a deformable
    network trained with it learnt such shifts (held-out Dice 0.356 before, 0.299 after, at
    step 2000). Linear in ``p``, a blend of two placements scores the blend of their losses,
    so only a better placement lowers it.
    """
    if moved.shape != fixed.shape:
        raise ValueError(
            f'moved and fixed maps must have the same shape, got {tuple(moved.shape)} and '
            f'{tuple(fixed.shape)}'
        )
    return (moved + fixed - 2 * moved * fixed).flatten(1).mean(1)


def overlap_dice(moved: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """One minus the soft Dice of one-hot maps ``(B, K, ...)``, averaged over labels, ``(B,)``.

    Per label, ``sum p (1 - q) + q (1 - p)`` (the summand of :func:`overlap_mse`) divided by
    ``sum p + q`` is ``1 - 2 sum pq / sum (p + q)``: the same linear overlap, with every label
    weighted equally instead of by its volume, as the Dice of the evaluation weights them (the
    loss of the first SynthMorph paper). Labels absent from both maps are left out.
    """
    if moved.shape != fixed.shape:
        raise ValueError(
            f'moved and fixed maps must have the same shape, got {tuple(moved.shape)} and '
            f'{tuple(fixed.shape)}'
        )
    inter = (moved * fixed).flatten(2).sum(2)
    total = (moved + fixed).flatten(2).sum(2)
    present = total > 1e-6
    per_label = torch.where(present, 1 - 2 * inter / total.clamp(min=1e-6), 0.0)
    return per_label.sum(1) / present.sum(1).clamp(min=1)


def grad_l2(disp: torch.Tensor) -> torch.Tensor:
    """Smoothness: mean squared forward difference of a displacement ``(B, 3, ...)``, ``(B,)``.

    neurite's ``spatial_gradient`` (voxelmorph's ``Grad('l2')``): the mean over the three
    axes of the mean squared difference between neighbouring voxels.
    """
    if disp.ndim != 5 or disp.shape[1] != 3:
        raise ValueError(f'disp must be (B, 3, X, Y, Z), got shape {tuple(disp.shape)}')
    return ne.nn.functional.spatial_gradient(
        disp, penalty='l2', reduction='mean', reduction_dim=(1, 2, 3, 4)
    )


def deform_loss(
    moved: torch.Tensor,
    fixed: torch.Tensor,
    disp: torch.Tensor,
    lam: torch.Tensor,
    overlap_weight: float = 10.0,
    overlap: str = 'mse',
    smooth_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hypernetwork's loss ``(1 - lam) * w * overlap + lam * s * smoothness``, per item.

    Parameters
    ----------
    moved, fixed : (B, K, ...) one-hot maps (moved labels pulled by ``disp``, fixed labels).
    disp : (B, 3, ...) the displacement that moved them (voxel units).
    lam : (B, 1) or (B,) regularisation weights in [0, 1], the hypernetwork's input.
    overlap_weight : float
        ``w``, voxelmorph's ``--loss-mult`` (10), balancing the small one-hot MSE.
    overlap : {'mse', 'dice'}
        :func:`overlap_mse` (labels weighted by volume) or :func:`overlap_dice` (equally).
    smooth_weight : float
        ``s``: scales the smoothness term, so that lambda trades overlap for smoothness over
        its whole range (see ``TrainConfig.smooth_weight``).

    Returns
    -------
    total, overlap, smooth : (B,) tensors.
    """
    lam = lam.reshape(-1).to(moved.dtype)
    if lam.shape[0] != moved.shape[0]:
        raise ValueError(f'lam must hold one value per batch item, got {tuple(lam.shape)}')
    if overlap not in OVERLAPS:
        raise ValueError(f'overlap must be one of {OVERLAPS}, got {overlap!r}')
    term = overlap_mse(moved, fixed) if overlap == 'mse' else overlap_dice(moved, fixed)
    smooth = grad_l2(disp)
    return (1 - lam) * overlap_weight * term + lam * smooth_weight * smooth, term, smooth


def dice(a: torch.Tensor, b: torch.Tensor, labels) -> torch.Tensor:
    """Dice overlap of each label in ``labels`` between two label maps, ``(B, len(labels))``.

    ``a`` and ``b`` are ``(B, 1, ...)`` integer maps. A label absent from both gets NaN.
    """
    if a.shape != b.shape:
        raise ValueError(f'label maps differ in shape: {tuple(a.shape)} and {tuple(b.shape)}')
    out = []
    for label in labels:
        ma = (a == label).flatten(1)
        mb = (b == label).flatten(1)
        inter = (ma & mb).sum(1).double()
        total = (ma.sum(1) + mb.sum(1)).double()
        out.append(torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.nan))
    return torch.stack(out, 1)
