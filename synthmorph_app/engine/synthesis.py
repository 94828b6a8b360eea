"""Synthetic training pairs from label maps, on the fly, in torch (CPU or CUDA).

SynthMorph's networks never see a real image in training: every pair is drawn from label maps,
with a random spatial transform and a random contrast for each image (Hoffmann et al., IEEE TMI
2022; Imaging Neuroscience 2024). This module does that at the networks' working grid.

Conventions
-----------
* The working grid is :func:`spatial.network_grid` of each label map: isotropic LIA voxels of
  ``voxel_size`` mm, ``shape`` voxels, centred on the map's field of view, the grid the networks
  see at inference. :func:`load_label_maps` downsamples each map there once (mode over blocks,
  then nearest neighbour) and keeps the result in memory as compact indices.
* Volumes are ``(B, C, X, Y, Z)``; coordinates are voxel indices of that grid, sampled with
  ``align_corners=True`` semantics (:func:`spatial.sample_grid`).
* Each synthetic image ``k`` (fixed ``f``, moving ``m``) shows label map ``L_k`` through
  ``T_k(x) = P_k A_k (x + d_k(x))``: ``d_k = exp(v_k)`` a random diffeomorphic displacement on the
  output grid, ``A_k`` a random affine about the grid centre, and ``P_k`` the map's
  pre-alignment to a common space (identity unless :attr:`SynthesisSettings.prealign`).
* The ground truth returned (:class:`SynthPair` ``affine`` and ``coords``) is the pulling map
  ``phi = T_m^-1 o T_f`` from fixed voxels to moving voxels (the convention of the affine
  networks' matrices): ``moving_labels(phi(x)) == fixed_labels(x)`` when both images come from one
  map. For two different maps it is the synthetic part of the transform (their pre-alignment
  relates the maps).
* Randomness comes only from the ``torch.Generator`` passed in (:func:`step_generator` makes one
  per training step, so a stream of pairs is reproducible whatever the workers or restarts).

What we take from neurite / voxelmorph 0.3.4, and why we write the rest
------------------------------------------------------------------------
* ``ne.nn.functional.upsample_noise`` (smooth noise with a generator) makes the velocity fields,
  bias fields and random shapes; ``ne.nn.functional.gaussian_smoothing`` (separable) blurs;
  ``vxm.functional.params_to_affine`` composes the affine (with shear).
* ``vxm.random_transform``/``random_affine``/``random_disp`` draw from NumPy's global RNG (no
  generator: not reproducible per step) and have no shear, so we draw their parameters
  ourselves. ``ne.nn.functional.sample_image_from_labels`` also uses the global RNG and loops
  over masks; our lookup-table version draws a mean and a standard deviation per label in one
  gather. neurite 0.3.4 (PyTorch) has no ``labels_to_image`` with the SynthMorph augmentations
  (thick slices, bias, gamma, crops, label removal): those are written here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import neurite as ne
import nibabel as nb
import numpy as np
import torch
import torch.nn.functional as F
import voxelmorph as vxm

from ..io.images import Geometry
from . import spatial
from .losses import LabelGroups, load_label_groups

LOGGER = logging.getLogger('synthmorph_app.engine.synthesis')

__all__ = [
    'LabelMaps',
    'SynthPair',
    'SynthStream',
    'SynthesisSettings',
    'Synthesizer',
    'curriculum_factor',
    'downsample_labels',
    'draw_contrast',
    'fit_prealignment',
    'label_map_paths',
    'labels_to_image',
    'load_label_maps',
    'random_affine',
    'random_shapes',
    'random_velocity',
    'step_generator',
]

#: Label maps kept out of training for validation (``../shared/data/label_maps``).
VALIDATION_MAPS = ('training_seg_19', 'training_seg_20')


def _check_range(name: str, value, low: float = 0.0, high: float | None = None) -> None:
    lo, hi = value
    if not (low <= lo <= hi) or (high is not None and hi > high):
        bound = f'[{low}, {high}]' if high is not None else f'[{low}, inf)'
        raise ValueError(f'{name} must be an ordered (min, max) range within {bound}, got {value}')


@dataclass(frozen=True)
class SynthesisSettings:
    """Random ranges of the synthesis (defaults: voxelmorph's SynthMorph training scripts).

    Lengths are in mm (converted to voxels of the working grid), angles in degrees; a
    ``(min, max)`` pair is sampled uniformly. Each image of a pair gets its own draw.

    Spatial
    -------
    shift : float
        Translation per axis ~ U(-shift, shift) mm (published 30).
    rotate : float
        Rotation about each axis ~ U(-rotate, rotate) degrees (published 45).
    scale : float
        Scaling per axis ~ U(1 - scale, 1 + scale) (published 0.1).
    head_size : (float, float)
        An isotropic size factor per image, log-uniform in ``head_size``, on top of ``scale``:
        heads smaller or larger than the label maps' adults (a newborn's head is about 0.7 of
        an adult's per axis). ``(1, 1)``, the default and the published setting, draws
        nothing, so runs without it keep their random stream.
    shear : float
        Shear terms ~ U(-shear, shear) (published 0.1).
    warp_probability : float
        Probability that an image gets a random deformation.
    warp_std : (float, float)
        SD of the velocity-field noise, mm (range of the per-image SD).
    warp_spacing : (float, float)
        Spacing of the noise control points, mm: larger is smoother (8-32 mm; FWHM 8-32 in the
        paper).
    warp_steps : int
        Scaling-and-squaring steps integrating the velocity (>= 0).
    prealign : bool
        Pre-align each map to the maps' common space (:func:`fit_prealignment`), so that pairs
        differ only by the random transforms: for training the deformable model on affinely
        aligned inputs.

    Pairs
    -----
    same_map_probability : float
        Probability that moving and fixed come from one label map (published: 0).
    shapes_probability : float
        Probability that a pair shows a random-shape map (:func:`random_shapes`) instead of
        anatomy; both images then show the same shapes, and every shape counts in the loss.
    shapes_labels : int
        Number of shapes (at most the number of loss channels).
    shapes_spacing : (float, float)
        Size of the shapes (noise control-point spacing), mm.
    same_contrast_probability : float
        Probability that both images of a pair share one draw of the label intensities and of
        the removed labels (:func:`draw_contrast`; blur, slices, bias, noise, gamma and crop
        stay independent): a same-contrast pair, easier to match for an untrained network
        (a curriculum knob; published: 0).

    Intensities (each image independently; see :func:`labels_to_image`)
    --------------------------------------------------------------------
    mean_range : (float, float)
        Mean intensity of each label ~ U(mean_range) (published U(0, 1)).
    std_range : (float, float)
        Within-label SD (texture), per label, ~ U(std_range).
    zero_background_probability : float
        Probability that the background (label 0) is exactly 0.
    strip_probability : float
        Probability of removing every removable (non-brain) label: they take the background's
        intensities, as after skull stripping.
    drop_probability : float
        Otherwise, probability of removing each removable label on its own.
    blur_max : float
        Partial-volume blur: Gaussian SD per axis ~ U(0, blur_max) mm (published 3.4).
    slice_probability : float
        Probability of simulating thick slices along one random axis (published 1).
    slice_spacing : (float, float)
        Slice thickness and spacing ~ U(slice_spacing) mm (1-8 mm); no effect below the voxel.
    bias_std : (float, float)
        SD of the log bias field ~ U(bias_std) (multiplicative field ``exp(b)``).
    bias_spacing : float
        Control-point spacing of the bias field, mm (smoothness).
    noise_std : (float, float)
        SD of additive Gaussian noise ~ U(noise_std), relative to the [0, 1] mean range.
    gamma : (float, float)
        Gamma exponent ~ U(gamma) applied after min-max normalisation (0.5-1.5).
    crop_probability : float
        Probability of blanking a slab at one random face of the field of view (published 1).
    crop_max : float
        Thickness of that slab ~ U(0, crop_max) of the axis (published 0.2).
    """

    shift: float = 30.0
    rotate: float = 45.0
    scale: float = 0.1
    head_size: tuple = (1.0, 1.0)
    shear: float = 0.1
    warp_probability: float = 1.0
    warp_std: tuple = (0.0, 3.0)
    warp_spacing: tuple = (8.0, 32.0)
    warp_steps: int = 5
    prealign: bool = False
    same_map_probability: float = 0.0
    shapes_probability: float = 0.0
    shapes_labels: int = 24
    shapes_spacing: tuple = (16.0, 48.0)
    same_contrast_probability: float = 0.0
    mean_range: tuple = (0.0, 1.0)
    std_range: tuple = (0.0, 0.1)
    zero_background_probability: float = 0.2
    strip_probability: float = 0.3
    drop_probability: float = 0.1
    blur_max: float = 3.4
    slice_probability: float = 1.0
    slice_spacing: tuple = (1.0, 8.0)
    bias_std: tuple = (0.0, 0.3)
    bias_spacing: float = 40.0
    noise_std: tuple = (0.0, 0.05)
    gamma: tuple = (0.5, 1.5)
    crop_probability: float = 1.0
    crop_max: float = 0.2

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        for name in ('shift', 'rotate', 'shear', 'blur_max', 'bias_spacing'):
            if getattr(self, name) < 0:
                raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')
        if not 0 <= self.scale < 1:
            raise ValueError(f'scale must lie in [0, 1), got {self.scale}')
        for name in ('warp_probability', 'same_map_probability', 'shapes_probability',
                     'same_contrast_probability',
                     'zero_background_probability', 'strip_probability', 'drop_probability',
                     'slice_probability', 'crop_probability', 'crop_max'):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f'{name} must lie in [0, 1], got {value}')
        _check_range('head_size', self.head_size)
        if self.head_size[0] <= 0:
            raise ValueError(f'head_size must be positive, got {self.head_size}')
        _check_range('warp_std', self.warp_std)
        _check_range('warp_spacing', self.warp_spacing)
        _check_range('shapes_spacing', self.shapes_spacing)
        _check_range('mean_range', self.mean_range)
        _check_range('std_range', self.std_range)
        _check_range('slice_spacing', self.slice_spacing)
        _check_range('bias_std', self.bias_std)
        _check_range('noise_std', self.noise_std)
        _check_range('gamma', self.gamma)
        if self.gamma[0] <= 0:
            raise ValueError(f'gamma must be positive, got {self.gamma}')
        if self.warp_spacing[0] <= 0 or self.shapes_spacing[0] <= 0:
            raise ValueError('warp_spacing and shapes_spacing must be positive')
        if self.warp_steps < 0:
            raise ValueError(f'warp_steps must be >= 0, got {self.warp_steps}')
        if self.shapes_labels < 2:
            raise ValueError(f'shapes_labels must be >= 2, got {self.shapes_labels}')

    @classmethod
    def for_task(cls, task: str, **overrides) -> SynthesisSettings:
        """Our settings for training ``task`` ('affine', 'rigid', 'deform', 'joint').

        ``affine``/``joint``: the published ranges. ``rigid``: the same, half the pairs from one
        map (a rigid model serves same-subject registration). ``deform``: maps pre-aligned to
        their common space and a small residual affine (rotations up to 5 degrees, shifts up to
        5 mm, scale and shear 0.03), as the deformable model sees the affine model's output.
        """
        presets = {
            'affine': {},
            'joint': {},
            'rigid': {'same_map_probability': 0.5},
            'deform': {'prealign': True, 'shift': 5.0, 'rotate': 5.0, 'scale': 0.03,
                       'shear': 0.03},
        }
        if task not in presets:
            raise ValueError(f'task must be one of {sorted(presets)}, got {task!r}')
        return cls(**{**presets[task], **overrides})

    def scaled(self, factor: float) -> SynthesisSettings:
        """The same settings with the affine ranges (shift, rotate, scale, shear) times
        ``factor`` in [0, 1], and the log of ``head_size`` too: easier pairs for a curriculum
        (:func:`curriculum_factor`)."""
        if not 0 <= factor <= 1:
            raise ValueError(f'factor must lie in [0, 1], got {factor}')
        if factor == 1:
            return self
        return replace(self, shift=self.shift * factor, rotate=self.rotate * factor,
                       scale=self.scale * factor, shear=self.shear * factor,
                       head_size=tuple(v ** factor for v in self.head_size))

    def to_dict(self) -> dict:
        """JSON-able dict of the settings."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self)}

    def replace(self, **changes) -> SynthesisSettings:
        """A copy with some settings changed."""
        return replace(self, **changes)


# -- label maps --------------------------------------------------------------------------------


def label_map_paths(
    folder: str | Path, validation: Sequence[str] = VALIDATION_MAPS
) -> tuple[list[Path], list[Path]]:
    """The label maps (``*.nii``, ``*.nii.gz``, ``*.mgz``) in ``folder``, split in two lists:
    training, and validation (the maps whose name without extension is in ``validation``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'the label-map folder <{folder}> does not exist')
    paths = sorted(
        p for p in folder.iterdir() if p.name.endswith(('.nii', '.nii.gz', '.mgz'))
    )
    if not paths:
        raise FileNotFoundError(f'no label maps (.nii, .nii.gz, .mgz) in <{folder}>')
    keep = set(validation)
    val = [p for p in paths if _stem(p) in keep]
    train = [p for p in paths if _stem(p) not in keep]
    return train, val


def _stem(path: Path) -> str:
    name = Path(path).name
    for suffix in ('.nii.gz', '.nii', '.mgz'):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def downsample_labels(data: np.ndarray, source: Geometry, target: Geometry) -> np.ndarray:
    """Resample a label map onto a coarser grid without inventing labels.

    Two steps: the most frequent label of each block of ``k`` voxels per axis (``k`` the whole
    ratio of voxel sizes; ties go to the smaller label, ``torch.mode``), then nearest neighbour
    onto ``target`` (skipped when the block grid already is ``target``, as for a conformed
    256^3 1 mm map and a 2 or 4 mm network grid of 256 mm). Voxels outside the map get 0.
    """
    if data.ndim != 3:
        raise ValueError(f'expected a 3D label map, got shape {data.shape}')
    ratio = np.asarray(target.voxel_sizes) / np.asarray(source.voxel_sizes)
    k = np.maximum(1, np.floor(ratio + 1e-6)).astype(int)
    lab = torch.from_numpy(np.ascontiguousarray(data).astype(np.int32))
    if np.any(k > 1):
        n = [s // f for s, f in zip(lab.shape, k)]
        lab = lab[: n[0] * k[0], : n[1] * k[1], : n[2] * k[2]]
        blocks = lab.reshape(n[0], k[0], n[1], k[1], n[2], k[2]).permute(0, 2, 4, 1, 3, 5)
        lab = blocks.reshape(*n, -1).mode(dim=-1).values
    block = np.eye(4)
    block[:3, :3] = np.diag(k)
    block[:3, 3] = (k - 1) / 2
    inter = Geometry(tuple(int(s) for s in lab.shape), source.affine @ block)
    if inter == target:
        return lab.numpy()
    out = spatial.resample_linear(lab.float()[None, None], inter, target, mode='nearest')
    return out[0, 0].round().to(torch.int32).numpy()


def fit_prealignment(centroids: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Affine matrices from a common space to each map, fitted on label centroids.

    ``centroids`` ``(N, K, 3)`` voxel centroids of K labels in N maps; ``present`` ``(N, K)``
    boolean. The common space puts each label at its mean centroid over the maps; map ``i``'s
    matrix ``P_i`` (4x4, common voxel -> map voxel) is the least-squares affine from the mean
    centroids to its own. Returns ``(N, 4, 4)`` float64.
    """
    n_maps = centroids.shape[0]
    counts = present.sum(0)
    mean = np.where(counts[:, None] > 0,
                    (centroids * present[..., None]).sum(0) / np.maximum(counts, 1)[:, None], 0)
    out = np.tile(np.eye(4), (n_maps, 1, 1))
    for i in range(n_maps):
        use = present[i] & (counts > 0)
        if use.sum() < 4:
            continue
        src = np.c_[mean[use], np.ones(use.sum())]
        sol, *_ = np.linalg.lstsq(src, centroids[i, use], rcond=None)
        out[i, :3, :] = sol.T
    return out


@dataclass
class LabelMaps:
    """Label maps on their working grids, as compact label indices, in memory.

    Attributes
    ----------
    index : torch.Tensor
        ``(N, 1, X, Y, Z)`` uint8 (int16 beyond 255 labels): label index of every voxel.
    values : torch.Tensor
        ``(L,)`` long: the label value of each index; ``values[0] == 0`` (background).
    geometries : list of Geometry
        Each map's working grid (network grid centred on its field of view).
    names : list of str
        File names without extension.
    prealign : torch.Tensor
        ``(N, 4, 4)`` float64 voxel matrices, common space -> each map (:func:`fit_prealignment`
        on the loss labels' centroids; identity when no label groups were given).
    voxel_size : float
        Voxel size of the working grid, mm.
    """

    index: torch.Tensor
    values: torch.Tensor
    geometries: list
    names: list
    prealign: torch.Tensor
    voxel_size: float

    def __len__(self) -> int:
        return self.index.shape[0]

    @property
    def shape(self) -> tuple:
        return tuple(self.index.shape[2:])

    def to(self, device) -> LabelMaps:
        """The same maps with ``index`` on ``device``."""
        return replace(self, index=self.index.to(device))

    def labels(self, i: int) -> torch.Tensor:
        """Map ``i`` as label values ``(1, 1, X, Y, Z)`` (long)."""
        return self.values.to(self.index.device)[self.index[i : i + 1].long()]


def load_label_maps(
    paths: Sequence[str | Path],
    voxel_size: float = 4.0,
    shape: int | Sequence[int] = 64,
    groups: LabelGroups | None = None,
) -> LabelMaps:
    """Load label maps and downsample each once onto its working grid.

    Parameters
    ----------
    paths : sequence of paths
        NIfTI or MGZ label maps (integer labels, any orientation and voxel size).
    voxel_size, shape
        The working grid: ``shape`` voxels of ``voxel_size`` mm (LIA, centred on each map's
        field of view; :func:`spatial.network_grid`). 2 mm x 128 or 4 mm x 64 span 256 mm.
    groups : LabelGroups, optional
        Label groups: their loss labels' centroids give the pre-alignment. Default: the packaged
        FreeSurfer table.
    """
    if not paths:
        raise ValueError('no label maps given')
    groups = groups or load_label_groups()
    maps, geoms, names = [], [], []
    for path in paths:
        img = nb.load(str(path))
        data = np.asanyarray(img.dataobj)
        if data.ndim != 3:
            data = data.reshape(data.shape[:3]) if data.size == np.prod(data.shape[:3]) else data
        if data.ndim != 3:
            raise ValueError(f'the label map <{path}> is not 3D (shape {data.shape})')
        data = _checked_labels(data, path)
        source = Geometry.from_image(img)
        target = spatial.network_grid(source, voxel_size, shape)
        maps.append(downsample_labels(data, source, target))
        geoms.append(target)
        names.append(_stem(Path(path)))
        LOGGER.info('loaded %s onto %s voxels of %.1f mm', path, target.shape, voxel_size)
    values = np.unique(np.concatenate([np.unique(m) for m in maps]))
    if values[0] != 0:
        values = np.r_[0, values]
    lut = {int(v): i for i, v in enumerate(values)}
    dtype = torch.uint8 if len(values) <= 256 else torch.int16
    index = torch.stack([torch.from_numpy(_to_index(m, values)).to(dtype) for m in maps])[:, None]
    values_t = torch.as_tensor(values, dtype=torch.long)
    # Pre-alignment from the centroids of the loss labels.
    loss = [lab for lab in groups.loss if lab in lut]
    centroids = np.zeros((len(maps), len(loss), 3))
    present = np.zeros((len(maps), len(loss)), dtype=bool)
    for i, m in enumerate(maps):
        for j, lab in enumerate(loss):
            where = np.argwhere(m == lab)
            if len(where):
                centroids[i, j] = where.mean(0)
                present[i, j] = True
    if not present.any():
        raise ValueError(
            f'none of the label maps ({", ".join(names[:3])}{", ..." if len(names) > 3 else ""}) '
            f'holds a label the loss counts ({len(groups.loss)} labels of the label table, '
            'FreeSurfer numbering by default): give a label table of their numbering '
            '(--label-table, a TSV with columns label, name, loss, removable)'
        )
    prealign = torch.from_numpy(fit_prealignment(centroids, present))
    return LabelMaps(index, values_t, geoms, names, prealign, float(voxel_size))


#: In a label map most labelled voxels carry the label of their neighbour; in an MRI image
#: stored as whole numbers few do. Measured along the first axis (share of non-zero voxels):
#: FreeSurfer aseg 0.86, the shared training maps 0.86-0.88, DLMUSE at 2 mm 0.73; T1w, FLAIR
#: and FreeSurfer norm/brain images 0.12-0.28, fsaverage's smooth average brain 0.15.
MIN_SAME_NEIGHBOUR = 0.5


def _checked_labels(data: np.ndarray, path) -> np.ndarray:
    """``data`` as whole-number labels, or ``ValueError`` where it is an intensity image.

    An image with fractional values, or whose voxels mostly differ from their neighbour
    (:data:`MIN_SAME_NEIGHBOUR`), is an MRI image, not a segmentation: training on it would
    take every grey level for a structure, without a word.
    """
    hint = ("an intensity image, not a label map (give segmentations such as FreeSurfer's "
            "aseg or SynthSeg's)")
    if np.issubdtype(data.dtype, np.floating):
        frac = np.abs(data - np.rint(data))
        if float(np.nanmax(frac)) > 1e-3:
            raise ValueError(f'<{path}> holds fractional values ({int((frac > 1e-3).sum())} '
                             f'voxels): {hint}')
    labels = np.rint(data).astype(np.int32)
    labelled = labels[:-1] != 0
    if labelled.any():
        same = float((labels[:-1] == labels[1:])[labelled].mean())
        if same < MIN_SAME_NEIGHBOUR:
            raise ValueError(f'<{path}>: only {same:.0%} of its labelled voxels share the value '
                             f'of their neighbour: {hint}')
    return labels


def _to_index(data: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Label values -> their position in the sorted ``values``."""
    return np.searchsorted(values, data).astype(np.int64)


# -- random draws --------------------------------------------------------------------------


def curriculum_factor(step: int, steps: int, start: float = 0.2) -> float:
    """Fraction of the affine ranges at ``step`` of a curriculum of ``steps`` steps.

    Grows linearly from ``start`` at step 0 to 1 at ``steps`` (1 throughout when ``steps`` is
    0). Large misalignments give the overlap loss no gradient (the warped labels do not touch
    their targets), so small ones first help a network from scratch on a small budget.
    """
    if steps <= 0 or step >= steps:
        return 1.0
    return start + (1 - start) * step / steps


def step_generator(
    seed: int, step: int, device: str | torch.device = 'cpu', stream: int = 0
) -> torch.Generator:
    """A generator seeded from ``(seed, step, stream)`` (mixed by NumPy's ``SeedSequence``).

    One per training step makes the stream of synthetic pairs a function of the step alone: the
    same after a restart, and independent of how many DataLoader workers produce it. ``stream``
    separates independent uses within a step (0: synthesis).
    """
    entropy = [int(seed), int(step), int(stream)]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return gen


def _uniform(gen: torch.Generator, low: float, high: float, size=()) -> torch.Tensor:
    u = torch.rand(size, generator=gen, device=gen.device, dtype=torch.float64)
    return low + (high - low) * u


def _scalar(gen: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return float(_uniform(gen, low, high))


def _randint(gen: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (), generator=gen, device=gen.device))


def random_affine(
    gen: torch.Generator, settings: SynthesisSettings, shape, voxel_size: float
) -> torch.Tensor:
    """A random affine about the grid centre, as a voxel matrix ``(4, 4)`` float64 (CPU).

    Parameters are drawn from ``gen`` within the ranges of ``settings`` (shift in mm, converted
    to voxels) and composed by ``vxm.functional.params_to_affine`` (translation, rotation,
    scaling, shear: ``T R Z S``).
    """
    shift = _uniform(gen, -settings.shift, settings.shift, (3,)) / voxel_size
    angles = _uniform(gen, -settings.rotate, settings.rotate, (3,))
    scale = _uniform(gen, 1 - settings.scale, 1 + settings.scale, (3,))
    if tuple(settings.head_size) != (1.0, 1.0):
        low, high = (math.log(v) for v in settings.head_size)
        scale = scale / math.exp(_scalar(gen, low, high))  # the matrix pulls: 1/size
    shear = _uniform(gen, -settings.shear, settings.shear, (3,))
    mat = vxm.functional.params_to_affine(
        3, translation=shift.cpu(), rotation=angles.cpu(), scale=scale.cpu(),
        shear=shear.cpu(), degrees=True,
    ).double()
    centre = torch.eye(4, dtype=torch.float64)
    centre[:3, 3] = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
    return centre @ mat @ torch.linalg.inv(centre)


def random_velocity(
    gen: torch.Generator, shape, voxel_size: float, std: float, spacing: float
) -> torch.Tensor:
    """A smooth random velocity field ``(1, 3, x, y, z)`` on the half-resolution grid.

    ``x, y, z = max(2, n // 2)``; the grid shares its corners with the full grid
    (:func:`spatial.resize_field`). Noise drawn on control points ``spacing`` mm apart and
    interpolated (``ne.nn.functional.upsample_noise``), SD ``std`` mm, in half-grid voxels.
    """
    half = tuple(max(2, s // 2) for s in shape)
    step_mm = voxel_size * (shape[0] - 1) / max(half[0] - 1, 1)
    noise = ne.nn.functional.upsample_noise(
        (1, 3, *half), scale=max(spacing / step_mm, 1.0), device=gen.device, generator=gen
    )
    return noise * (std / step_mm)


def random_shapes(
    gen: torch.Generator, shape, num_labels: int, spacing_voxels: float
) -> torch.Tensor:
    """A random-shape label map ``(1, 1, *shape)`` (long, labels 1..num_labels).

    The argmax over ``num_labels`` channels of smooth noise (control points ``spacing_voxels``
    apart), drawn at half resolution and upsampled by nearest neighbour, as SynthMorph's
    shape-agnostic training (Hoffmann et al., IEEE TMI 2022).
    """
    half = tuple(max(2, s // 2) for s in shape)
    noise = ne.nn.functional.upsample_noise(
        (1, num_labels, *half), scale=max(spacing_voxels / 2, 1.0), device=gen.device,
        generator=gen,
    )
    lab = noise.argmax(1, keepdim=True).float() + 1
    return F.interpolate(lab, size=tuple(shape), mode='nearest').long()


def _thick_slices(image: torch.Tensor, axis: int, count: int) -> torch.Tensor:
    """Average ``image`` into ``count`` thick slabs along ``axis``, interpolate back."""
    x = image.movedim(2 + axis, 2)
    size = x.shape[2:]
    low = F.interpolate(x, size=(count, *size[1:]), mode='area')
    up = F.interpolate(low, size=tuple(size), mode='trilinear', align_corners=False)
    return up.movedim(2, 2 + axis)


def draw_contrast(
    removable: torch.Tensor, gen: torch.Generator, settings: SynthesisSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intensity mean and SD per label index ``(L,)`` each (on ``gen``'s device): a Gaussian
    intensity per label (mean ~ U(mean_range), SD ~ U(std_range)), the background at 0 at
    random, and removable labels (``removable`` ``(L,)``) blanked at random: they take the
    background's intensities."""
    s = settings
    count = removable.numel()
    means = _uniform(gen, *s.mean_range, (count,)).float()
    stds = _uniform(gen, *s.std_range, (count,)).float()
    if _scalar(gen) < s.zero_background_probability:
        means[0] = 0
        stds[0] = 0
    removable = removable.to(means.device)
    if _scalar(gen) < s.strip_probability:
        remove = removable
    else:
        remove = removable & (_uniform(gen, 0, 1, (count,)) < s.drop_probability)
    return torch.where(remove, means[0], means), torch.where(remove, stds[0], stds)


def labels_to_image(
    index: torch.Tensor,
    removable: torch.Tensor,
    gen: torch.Generator,
    settings: SynthesisSettings,
    voxel_size: float,
    contrast: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A random-contrast image ``(1, 1, ...)`` in [0, 1] from a label-index map ``(1, 1, ...)``.

    In order: the label intensities (``contrast``, or a fresh :func:`draw_contrast`);
    partial-volume blur; thick slices along a random axis; a smooth multiplicative bias field;
    additive noise; min-max normalisation; gamma; a blank slab at one face of the field of view.
    ``removable`` ``(L,)`` flags the indices that may be removed.
    """
    s = settings
    dev = index.device
    means, stds = draw_contrast(removable, gen, s) if contrast is None else contrast
    idx = index.long()
    noise = torch.randn(index.shape, generator=gen, device=dev)
    image = means[idx] + stds[idx] * noise
    shape = tuple(index.shape[2:])

    sigma = (_uniform(gen, 0, s.blur_max, (3,)) / voxel_size).clamp(min=1e-3)
    if float(sigma.max()) > 0.2:
        image = ne.nn.functional.gaussian_smoothing(
            image, sigma=[float(v) for v in sigma], method='separable', padding_mode='replicate'
        )
    if _scalar(gen) < s.slice_probability:
        axis = _randint(gen, 3)
        spacing = _scalar(gen, *s.slice_spacing)
        slabs = max(2, round(shape[axis] * voxel_size / spacing))
        if slabs < shape[axis]:
            image = _thick_slices(image, axis, slabs)
    bias_sd = _scalar(gen, *s.bias_std)
    if bias_sd > 0:
        bias = ne.nn.functional.upsample_noise(
            (1, 1, *shape), scale=max(s.bias_spacing / voxel_size, 1.0), device=dev,
            generator=gen,
        )
        image = image * torch.exp(bias * bias_sd)
    noise_sd = _scalar(gen, *s.noise_std)
    if noise_sd > 0:
        image = image + noise_sd * torch.randn(image.shape, generator=gen, device=dev)
    lo, hi = image.min(), image.max()
    image = (image - lo) / (hi - lo).clamp(min=1e-6)
    image = image.clamp(0, 1) ** _scalar(gen, *s.gamma)
    if _scalar(gen) < s.crop_probability:
        axis = _randint(gen, 3)
        width = int(shape[axis] * _scalar(gen, 0, s.crop_max))
        if width > 0:
            cut = [slice(None)] * 5
            cut[2 + axis] = slice(0, width) if _scalar(gen) < 0.5 else slice(-width, None)
            image[tuple(cut)] = 0
    return image


# -- pairs ------------------------------------------------------------------------------------


@dataclass
class SynthPair:
    """A batch of synthetic pairs (all tensors ``(B, ...)`` on one device).

    Attributes
    ----------
    moving, fixed : (B, 1, X, Y, Z) float32 images in [0, 1].
    moving_seg, fixed_seg : (B, 1, X, Y, Z) long loss-channel maps (0 ignored, 1..K selected
        labels; :mod:`.losses`).
    moving_labels, fixed_labels : (B, 1, X, Y, Z) long label values (FreeSurfer numbers; 1..J
        for random shapes), for looking at and for Dice.
    affine : (B, 4, 4) float64 ground-truth linear part of ``phi``, fixed voxel -> moving voxel
        (exact when there is no deformation; see the module docstring).
    coords : (B, 3, X, Y, Z) float32 or None: ground-truth ``phi(x)`` in moving voxels for
        every fixed voxel (with ``truth=True``).
    info : list of dict: what each pair was drawn from (map names, shapes).
    """

    moving: torch.Tensor
    fixed: torch.Tensor
    moving_seg: torch.Tensor
    fixed_seg: torch.Tensor
    moving_labels: torch.Tensor
    fixed_labels: torch.Tensor
    affine: torch.Tensor
    coords: torch.Tensor | None = None
    info: list = field(default_factory=list)

    def to(self, device) -> SynthPair:
        """The same pair with its tensors on ``device``."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return SynthPair(**out)


class Synthesizer:
    """Draws synthetic pairs from label maps (see the module docstring).

    Parameters
    ----------
    maps : LabelMaps
        The label maps (on the device where synthesis runs).
    settings : SynthesisSettings
        Random ranges.
    groups : LabelGroups, optional
        Loss labels and removable labels (default: the packaged FreeSurfer table).
    """

    def __init__(
        self,
        maps: LabelMaps,
        settings: SynthesisSettings | None = None,
        groups: LabelGroups | None = None,
    ):
        self.maps = maps
        self.settings = settings or SynthesisSettings()
        self.groups = groups or load_label_groups()
        self.num_channels = self.groups.num_channels
        if self.settings.shapes_probability > 0 and self.settings.shapes_labels > self.num_channels:
            raise ValueError(
                f'shapes_labels ({self.settings.shapes_labels}) must not exceed the number of '
                f'loss channels ({self.num_channels})'
            )
        values = maps.values
        self._channel = self.groups.channel_lut(values)
        self._removable = self.groups.removable_mask(values)
        if not bool((self._channel > 0).any()):
            raise ValueError('none of the loss labels occurs in the label maps')

    @property
    def shape(self) -> tuple:
        return self.maps.shape

    @property
    def voxel_size(self) -> float:
        return self.maps.voxel_size

    def sample(
        self,
        gen: torch.Generator,
        batch_size: int = 1,
        truth: bool = False,
        affine_factor: float = 1.0,
    ) -> SynthPair:
        """``batch_size`` pairs drawn with ``gen`` (on ``gen.device``, like the maps).

        ``affine_factor`` scales the affine ranges (:meth:`SynthesisSettings.scaled`).
        """
        affine = self.settings.scaled(affine_factor)
        items = [self._one(gen, truth, affine) for _ in range(batch_size)]
        out = {}
        for f in fields(SynthPair):
            values = [item[f.name] for item in items]
            if f.name == 'info':
                out[f.name] = values
            elif values[0] is None:
                out[f.name] = None
            else:
                out[f.name] = torch.cat(values)
        return SynthPair(**out)

    def _one(self, gen: torch.Generator, truth: bool, affine: SynthesisSettings) -> dict:
        s = self.settings
        dev = gen.device
        shape = self.shape
        vox = self.voxel_size
        eye = torch.eye(4, dtype=torch.float64)
        if _scalar(gen) < s.shapes_probability:
            spacing = _scalar(gen, *s.shapes_spacing) / vox
            src_f = src_m = random_shapes(gen, shape, s.shapes_labels, spacing)
            count = s.shapes_labels + 1
            channel = torch.arange(count)
            values = torch.arange(count)
            removable = torch.zeros(count, dtype=torch.bool)
            pre_f = pre_m = eye
            info = {'fixed': 'shapes', 'moving': 'shapes'}
        else:
            n = len(self.maps)
            i = _randint(gen, n)
            j = i if (n == 1 or _scalar(gen) < s.same_map_probability) else _randint(gen, n)
            src_f = self.maps.index[i : i + 1].to(dev)
            src_m = self.maps.index[j : j + 1].to(dev)
            channel, values, removable = self._channel, self.maps.values, self._removable
            pre_f = self.maps.prealign[i] if s.prealign else eye
            pre_m = self.maps.prealign[j] if s.prealign else eye
            info = {'fixed': self.maps.names[i], 'moving': self.maps.names[j]}

        mat_f = pre_f @ random_affine(gen, affine, shape, vox)
        mat_m = pre_m @ random_affine(gen, affine, shape, vox)
        vel_f = self._velocity(gen)
        vel_m = self._velocity(gen)
        grid = spatial.identity_coords(shape, dev)
        lab_f = self._warp_labels(src_f, mat_f, grid, vel_f)
        lab_m = self._warp_labels(src_m, mat_m, grid, vel_m)
        contrast = None  # no extra draw at probability 0: the published streams stay as they were
        if s.same_contrast_probability > 0 and _scalar(gen) < s.same_contrast_probability:
            contrast = draw_contrast(removable, gen, s)
        img_f = labels_to_image(lab_f, removable, gen, s, vox, contrast)
        img_m = labels_to_image(lab_m, removable, gen, s, vox, contrast)
        channel = channel.to(dev)
        values = values.to(dev)
        lin = torch.linalg.inv(mat_m) @ mat_f
        out = {
            'fixed': img_f,
            'moving': img_m,
            'fixed_seg': channel[lab_f],
            'moving_seg': channel[lab_m],
            'fixed_labels': values[lab_f],
            'moving_labels': values[lab_m],
            'affine': lin[None],
            'coords': None,
            'info': info,
        }
        if truth:
            out['coords'] = self._truth(lin, grid, vel_f, vel_m)
        return out

    def _velocity(self, gen: torch.Generator) -> torch.Tensor | None:
        s = self.settings
        if _scalar(gen) >= s.warp_probability:
            return None
        std = _scalar(gen, *s.warp_std)
        spacing = _scalar(gen, *s.warp_spacing)
        return random_velocity(gen, self.shape, self.voxel_size, std, spacing)

    def _disp(self, velocity: torch.Tensor | None, sign: float = 1.0) -> torch.Tensor | None:
        if velocity is None:
            return None
        half = spatial.integrate_svf(sign * velocity, self.settings.warp_steps)
        return spatial.resize_field(half, self.shape)

    def _warp_labels(self, src, matrix, grid, velocity) -> torch.Tensor:
        pts = grid
        disp = self._disp(velocity)
        if disp is not None:
            pts = grid + disp[0]
        coords = _apply_matrix(matrix, pts)
        out = spatial.sample_grid(src.float(), coords, 'nearest')
        return out.round().long()

    def _truth(self, lin, grid, vel_f, vel_m) -> torch.Tensor:
        disp_f = self._disp(vel_f)
        pts = grid if disp_f is None else grid + disp_f[0]
        p = _apply_matrix(lin, pts)
        inv_m = self._disp(vel_m, -1.0)
        if inv_m is not None:
            p = p + spatial.sample_grid(inv_m, p, 'linear', padding='border')[0]
        return p[None].float()


def _apply_matrix(matrix: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Apply a 4x4 matrix (float64, any device) to points ``(3, ...)``."""
    m = matrix.to(device=pts.device, dtype=torch.float32)
    flat = pts.reshape(3, -1)
    return (m[:3, :3] @ flat + m[:3, 3:]).reshape(pts.shape)


class SynthStream(torch.utils.data.IterableDataset):
    """An endless, reproducible stream of ``(step, SynthPair)`` for a DataLoader.

    Pair ``step`` is drawn with :func:`step_generator` ``(seed, step)``, so the stream does not
    depend on the number of workers (worker ``w`` of ``W`` makes steps ``start + w``,
    ``start + w + W``, ...; the DataLoader returns them in order) and restarts exactly at
    ``start``. Use ``DataLoader(stream, batch_size=None, num_workers=...)``: items are batches.
    Synthesis runs on the CPU in the workers. ``curriculum`` (steps) grows the affine ranges
    (:func:`curriculum_factor`).
    """

    def __init__(
        self,
        synthesizer: Synthesizer,
        seed: int,
        start: int = 0,
        stop: int | None = None,
        batch_size: int = 1,
        truth: bool = False,
        curriculum: int = 0,
    ):
        super().__init__()
        self.synthesizer = synthesizer
        self.seed = int(seed)
        self.start = int(start)
        self.stop = stop
        self.batch_size = int(batch_size)
        self.truth = truth
        self.curriculum = int(curriculum)

    def __iter__(self) -> Iterator[tuple[int, SynthPair]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        step = self.start + worker
        while self.stop is None or step < self.stop:
            gen = step_generator(self.seed, step)
            factor = curriculum_factor(step, self.curriculum)
            yield step, self.synthesizer.sample(gen, self.batch_size, self.truth, factor)
            step += workers
