"""Training SynthMorph networks on synthetic pairs: a resumable, seeded training loop.

Tasks
-----
``affine`` / ``rigid``
    An affine network (``--arch detector|encoder|decomposer``) predicts the voxel matrix ``M``
    (fixed voxel -> moving voxel); the loss is the one-hot MSE of the selected brain labels
    between the moving labels pulled through ``M`` and the fixed labels.
``deform``
    The hypernetwork U-Net predicts a half-resolution velocity ``v`` from the pair and
    ``lam ~ U(0, 1)``; ``exp(v)`` pulls the moving labels; the loss is
    ``(1 - lam) * w * MSE + lam * grad-L2`` (:func:`.losses.deform_loss`). Pairs come from
    pre-aligned maps with small residual affines (:meth:`SynthesisSettings.for_task`). By
    default the velocity is the symmetric ``(D(m, f) - D(f, m)) / 2``, as at inference.
``joint``
    Both: the affine network's ``M`` warps the moving image, the hypernetwork deforms it
    further, and the same deformable loss trains both through the composed transform
    ``M (x + u(x))``.

The loss runs on the half-resolution grid of the deformable network
(:func:`.losses.half_to_full`) or, with ``loss_grid='full'``, on the working grid given by
``voxel_size`` and ``shape``.

Reproducibility (``monai.utils.set_determinism``, ``monai.handlers.CheckpointSaver``)
------------------------------------------------------------------------------------------
The pair of step ``s`` is drawn with :func:`.synthesis.step_generator` ``(seed, s)`` and the
step's other randomness (``lam``) with stream 1 of the same: the data are a function of the step
alone. A checkpoint holds the models, the optimizer, the step, the global RNG states and the
config; resuming from it repeats exactly what an uninterrupted run does next (tested).
Checkpoints are written every ``checkpoint_every`` steps, at the end, and on SIGINT/SIGTERM.

Outputs in ``out``: ``checkpoint.pt``, ``train_log.csv`` (step, losses, lam, times),
``validation.csv`` (Dice on held-out label maps), ``config.json``, and the models in our weights
format (``<kind>.pt`` + ``<kind>.json`` model card, :func:`.weights.save_model`). TensorBoard
event files go to ``out/tensorboard`` when the ``tensorboard`` package is installed.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import platform
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from . import losses as L
from . import spatial
from .synthesis import (
    VALIDATION_MAPS,
    LabelMaps,
    SynthesisSettings,
    Synthesizer,
    SynthPair,
    SynthStream,
    curriculum_factor,
    label_map_paths,
    load_label_maps,
    step_generator,
)

LOGGER = logging.getLogger('synthmorph_app.engine.training')

__all__ = [
    'ARCHS',
    'ARCH_DEFAULTS',
    'TASKS',
    'TrainConfig',
    'Trainer',
    'set_determinism',
]

TASKS = ('affine', 'rigid', 'deform', 'joint')
#: Grids of the deformable overlap term (:attr:`TrainConfig.loss_grid`).
LOSS_GRIDS = ('half', 'full')
#: ``--arch`` names -> network classes (:mod:`.networks`).
ARCHS = {'detector': 'AffineDetector', 'encoder': 'AffineEncoder',
         'decomposer': 'AffineDecomposer'}
#: Settings a fresh ``--arch`` run adds to its network's own defaults (``affine_model`` still
#: overrides them): without them neither the encoder (a global mean cannot tell where features
#: lie) nor the decomposer (a dense U-Net without a cost volume) left the identity on CPU
#: (docs/model_cards.md, session 16). The network classes keep their old defaults, so the
#: configs of earlier models build as they were.
ARCH_DEFAULTS = {'detector': {}, 'encoder': {'pool_grid': 4},
                 'decomposer': {'cost_volume': 1}}
#: TrainConfig fields checked through the networks they build when a run resumes (see
#: :meth:`Trainer.load_checkpoint`), not as settings.
MODEL_FIELDS = ('affine_model', 'deform_model')
#: Seed of the held-out validation pairs (fixed, whatever the training seed).
VALIDATION_SEED = 20240601
CHECKPOINT = 'checkpoint.pt'
LOG_FIELDS = ('step', 'loss', 'overlap', 'smooth', 'lam', 'synth_s', 'step_s', 'lr', 'wall_s')
VAL_FIELDS = ('step', 'dice', 'dice_before', 'pairs', 'seconds')


@dataclass
class TrainConfig:
    """Everything a training run depends on (written to ``out/config.json``).

    Parameters
    ----------
    task : {'affine', 'rigid', 'deform', 'joint'}
    label_maps : str
        Folder of label maps; the maps named in ``validation`` are held out.
    out : str
        Output folder (checkpoints, logs, models).
    arch : {'detector', 'encoder', 'decomposer'}
        Architecture of the affine/rigid network.
    steps : int
        Total optimisation steps (a resumed run continues up to this number).
    batch_size : int
    lr : float
        Adam learning rate. The published 1e-5 (deformable) is too slow for CPU budgets; 1e-4
        learns within minutes on a single pair (see the module tests).
    voxel_size, shape
        Working grid: ``shape``^3 voxels of ``voxel_size`` mm (4 mm x 64 = 256 mm).
    seed : int
    device : {'cpu', 'cuda'}
    checkpoint_every, validate_every : int
        Steps between checkpoints and between validations (0: never, except at the end).
    validation : list of str
        Names (without extension) of the held-out maps.
    validation_pairs : int
        Number of fixed synthetic pairs from the held-out maps.
    overlap_weight : float
        ``w`` of the deformable loss (voxelmorph's ``--loss-mult``, 10, for ``'mse'``).
    overlap : {'mse', 'dice'}
        Overlap term of the deformable loss: one-hot MSE (labels weighted by volume,
        :func:`.losses.overlap_mse`) or one minus soft Dice (labels weighted equally,
        :func:`.losses.overlap_dice`; use ``overlap_weight`` 1).
    smooth_weight : float
        ``s`` of the deformable loss ``(1 - lam) w overlap + lam s smoothness``. With the soft
        Dice overlap (about 0.5) beside the smoothness of a typical field (about 0.003), at
        ``s`` 1 the smoothness hardly counts at any lambda and the hypernetwork learns little
        from lambda; a larger ``s`` makes lambda trade overlap for smoothness.
    loss_grid : {'half', 'full'}
        Grid of the overlap term: the deformable network's half-resolution grid (SynthMorph's
        choice, 8x fewer voxels) or the working grid, where the velocity is upsampled and the
        labels keep their full detail (:meth:`Trainer.full_coords`).
    integration_steps : int
        Scaling-and-squaring steps of the velocity field during training.
    symmetric : bool
        Deformable velocity as ``(D(m, f) - D(f, m)) / 2`` (as :func:`register` uses it).
    affine_model, deform_model : dict
        Overrides of the networks' default configs (e.g. ``{'enc': [8, 16]}``); the affine
        network's defaults are its class's plus :data:`ARCH_DEFAULTS` of ``arch``.
    init_affine, init_deform : str or None
        Start from these weights (a model name or path, :func:`.weights.load_model`); their
        config replaces the defaults and overrides. A rigid task may start from an affine
        model (``init_affine: 'affine'``, the packaged detector): its network with the rigid fit.
    synthesis : dict
        Overrides of :meth:`SynthesisSettings.for_task` (task).
    workers : int
        DataLoader workers synthesising on the CPU (0: synthesise in the main process, on
        ``device``).
    threads : int or None
        ``torch.set_num_threads`` for the run.
    curriculum : int
        Steps over which the affine ranges of the synthesis grow from 20 % to 100 %
        (:func:`.synthesis.curriculum_factor`; 0: full ranges from the start). Validation
        always uses the full ranges.
    ema : float
        Decay of an exponential moving average of the weights (Polyak averaging; 0.999 averages
        over about the last 1000 steps; 0: off). With batch-1 steps on fresh pairs the weights
        wander from step to step; when on, validation and the exported models use the average,
        training goes on with the raw weights, and the checkpoint holds both. A run that
        switches it on at a resume starts the average from the checkpoint's weights.
    label_table : str or None
        The label groups (a TSV with columns ``label, name, loss, removable``:
        :func:`.losses.load_label_groups`); None: the packaged FreeSurfer table. Maps of
        another numbering need their own.
    """

    task: str
    label_maps: str
    out: str
    arch: str = 'detector'
    steps: int = 10000
    batch_size: int = 1
    lr: float = 1e-4
    voxel_size: float = 4.0
    shape: int = 64
    seed: int = 0
    device: str = 'cpu'
    checkpoint_every: int = 500
    validate_every: int = 1000
    validation: list = field(default_factory=lambda: list(VALIDATION_MAPS))
    validation_pairs: int = 8
    overlap_weight: float = 10.0
    overlap: str = 'mse'
    smooth_weight: float = 1.0
    loss_grid: str = 'half'
    integration_steps: int = 5
    symmetric: bool = True
    affine_model: dict = field(default_factory=dict)
    deform_model: dict = field(default_factory=dict)
    init_affine: str | None = None
    init_deform: str | None = None
    synthesis: dict = field(default_factory=dict)
    workers: int = 0
    threads: int | None = None
    curriculum: int = 0
    ema: float = 0.0
    label_table: str | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f'task must be one of {TASKS}, got {self.task!r}')
        if self.arch not in ARCHS:
            raise ValueError(f'arch must be one of {sorted(ARCHS)}, got {self.arch!r}')
        for name in ('steps', 'checkpoint_every', 'validate_every', 'workers',
                     'validation_pairs', 'integration_steps', 'curriculum'):
            if getattr(self, name) < 0:
                raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')
        if self.batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {self.batch_size}')
        if not 0 <= self.ema < 1:
            raise ValueError(f'ema must be in [0, 1), got {self.ema}')
        if self.smooth_weight < 0:
            raise ValueError(f'smooth_weight must be >= 0, got {self.smooth_weight}')
        if self.lr <= 0 or self.voxel_size <= 0 or self.shape < 8:
            raise ValueError('lr and voxel_size must be positive and shape at least 8')
        if self.overlap not in L.OVERLAPS:
            raise ValueError(f'overlap must be one of {L.OVERLAPS}, got {self.overlap!r}')
        if self.loss_grid not in LOSS_GRIDS:
            raise ValueError(f'loss_grid must be one of {LOSS_GRIDS}, got {self.loss_grid!r}')
        self.validation = list(self.validation)

    @property
    def kinds(self) -> tuple:
        """The model kinds this task trains."""
        return {'affine': ('affine',), 'rigid': ('rigid',), 'deform': ('deform',),
                'joint': ('affine', 'deform')}[self.task]

    def settings(self) -> SynthesisSettings:
        """The synthesis settings of this run."""
        return SynthesisSettings.for_task(self.task, **self.synthesis)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


#: TrainConfig fields a resumed run may change: how long, how fast and where it runs, how
#: often it saves and validates, and the start of weight averaging. Any other difference from
#: the checkpoint's config (loss, grids, synthesis, networks, seed) refuses to resume.
RESUMABLE_CHANGES = frozenset({
    'steps', 'lr', 'device', 'threads', 'workers', 'checkpoint_every', 'validate_every',
    'validation_pairs', 'ema', 'label_maps', 'out', 'init_affine', 'init_deform',
})

#: Network config keys that only say how a network started, with their value in checkpoints
#: written before the key existed: a run resumes whatever they say (:meth:`Trainer.load_checkpoint`).
INIT_KEYS = {'init': 'torch', 'hidden_init': 'torch'}


def _cloned(states: dict) -> dict:
    """A copy of ``{kind: state dict}`` whose tensors share no memory with the original."""
    return {kind: {k: v.detach().clone() for k, v in state.items()}
            for kind, state in states.items()}


def _initial_model(spec: str, kind: str):
    """The model of ``kind`` that a run starts from (``init_affine``/``init_deform``).

    A rigid run may also start from an affine model: the same network and weights, with the
    rigid (Kabsch) fit in place of the affine least squares, so the rigid model inherits the
    affine model's trained features.
    """
    from ..errors import WeightsError
    from .networks import build_model
    from .weights import load_model

    try:
        return load_model(spec, kind)[0]
    except WeightsError as err:
        if kind != 'rigid':
            raise
        try:
            affine = load_model(spec, 'affine')[0]
        except WeightsError:
            raise err from None
    rigid = build_model({**affine.config, 'rigid': True})
    rigid.load_state_dict(affine.state_dict())
    return rigid


def _without_init(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in INIT_KEYS}


def set_determinism(seed: int) -> None:
    """Seed Python, NumPy and torch (the only place global seeding happens)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state['python']))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _tuplify(value):
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


class _Interrupt:
    """Turns SIGINT/SIGTERM into a flag checked between steps."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def _handle(self, signum, frame):
        self.signal = signum
        LOGGER.warning('received signal %d: stopping after this step', signum)

    @contextmanager
    def installed(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers
            self._old = {}
        try:
            yield self
        finally:
            for sig, old in self._old.items():
                signal.signal(sig, old)


class Trainer:
    """Trains the models of one :class:`TrainConfig`; see the module docstring.

    Parameters
    ----------
    config : TrainConfig
    train_maps, val_maps : LabelMaps, optional
        Ready label maps (else loaded from ``config.label_maps`` at the config's grid).
    """

    def __init__(
        self,
        config: TrainConfig,
        train_maps: LabelMaps | None = None,
        val_maps: LabelMaps | None = None,
    ):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = torch.device(config.device)
        if self.device.type == 'cuda' and not torch.cuda.is_available():
            raise ValueError('--device cuda was requested but no CUDA device is available')
        set_determinism(config.seed)
        self.groups = L.load_label_groups(config.label_table)
        if train_maps is None or (val_maps is None and config.validation):
            train_paths, val_paths = label_map_paths(config.label_maps, config.validation)
            if not train_paths:
                raise ValueError(f'no training label maps left in <{config.label_maps}>')
            if train_maps is None:
                train_maps = load_label_maps(train_paths, config.voxel_size, config.shape,
                                             self.groups)
            if val_maps is None and val_paths:
                val_maps = load_label_maps(val_paths, config.voxel_size, config.shape,
                                           self.groups)
        self.settings = config.settings()
        synth_device = self.device if config.workers == 0 else torch.device('cpu')
        self.synthesizer = Synthesizer(train_maps.to(synth_device), self.settings, self.groups)
        self.val_maps = val_maps
        self.shape = train_maps.shape
        self.num_channels = self.groups.num_channels
        self.models = self._build_models()
        self.optimizer = self._optimizer()
        #: the weight average of ``config.ema`` (kind -> state dict), None when off
        self.average = self._weights() if config.ema else None
        self.step = 0
        self.wall = 0.0
        self._val_pairs = None
        self._tb = None
        for model in self.models.values():
            if any(s % model.multiple for s in self.shape):
                raise ValueError(
                    f'the working grid {self.shape} must be divisible by {model.multiple} for '
                    f'the {model.config["arch"]} network: change --shape or the network depth'
                )

    # -- models -----------------------------------------------------------------------------

    def _build_models(self) -> dict:
        from .networks import build_model, default_config

        cfg = self.config
        models = {}
        for kind in cfg.kinds:
            init = cfg.init_deform if kind == 'deform' else cfg.init_affine
            if init:
                model = _initial_model(init, kind)
            elif kind == 'deform':
                model = build_model({**default_config('deform'), **cfg.deform_model})
            else:
                base = {'arch': ARCHS[cfg.arch], 'rigid': kind == 'rigid',
                        **ARCH_DEFAULTS[cfg.arch]}
                model = build_model({**base, **cfg.affine_model})
            models[kind] = model.to(self.device).train()
        return models

    def _optimizer(self) -> torch.optim.Optimizer:
        """Adam over the parameters of every model, at the run's learning rate."""
        params = [p for m in self.models.values() for p in m.parameters()]
        return torch.optim.Adam(params, lr=self.config.lr)

    def _weights(self) -> dict:
        """A copy of every model's state (kind -> state dict)."""
        return _cloned({kind: model.state_dict() for kind, model in self.models.items()})

    def _update_average(self) -> None:
        if self.average is None:
            return
        with torch.no_grad():
            for kind, model in self.models.items():
                for key, value in model.state_dict().items():
                    avg = self.average[kind][key]
                    if avg.is_floating_point():
                        avg.lerp_(value, 1.0 - self.config.ema)
                    else:
                        avg.copy_(value)

    @contextlib.contextmanager
    def averaged(self):
        """Within this context the models hold the weight average (``config.ema``); the raw
        weights come back after it. Without an average, the models as they are."""
        if self.average is None:
            yield self.models
            return
        raw = self._weights()
        try:
            for kind, model in self.models.items():
                model.load_state_dict(self.average[kind])
            yield self.models
        finally:
            for kind, model in self.models.items():
                model.load_state_dict(raw[kind])

    @property
    def linear_kind(self) -> str | None:
        return next((k for k in self.models if k in ('affine', 'rigid')), None)

    # -- one step ---------------------------------------------------------------------------

    def _half(self) -> str:
        """Half-resolution convention of the loss grid (the deformable network's)."""
        if 'deform' in self.models:
            return self.models['deform'].config['downsample']
        return 'average'

    def _velocity(self, moving, fixed, lam):
        model = self.models['deform']
        if self.config.symmetric:
            from .networks import symmetric_velocity

            return symmetric_velocity(model, moving, fixed, lam)
        return model(moving, fixed, lam)

    def loss_maps(self, pair: SynthPair) -> tuple[torch.Tensor, torch.Tensor]:
        """One-hot maps ``(B, K, ...)`` of the moving and fixed loss labels on the loss grid
        (``config.loss_grid``: the working grid, or its half-resolution grid)."""
        seg_m = L.onehot(pair.moving_seg, self.num_channels)
        seg_f = L.onehot(pair.fixed_seg, self.num_channels)
        if self.config.loss_grid == 'full':
            return seg_m, seg_f
        mode = self._half()
        return L.halve(seg_m, mode), L.halve(seg_f, mode)

    def deform_terms(self, seg_m, seg_f, disp, lam, matrix=None):
        """``(total, overlap, smooth)`` of the deformable loss: ``seg_m`` (from
        :meth:`loss_maps`) pulled by the half-resolution displacement ``disp`` after the voxel
        matrix ``matrix`` (working grid, or None), against ``seg_f``."""
        cfg = self.config
        if cfg.loss_grid == 'full':
            points = self.full_coords(disp)
            if matrix is not None:
                points = L.apply_matrix(matrix.float(), points)
        else:
            grid = spatial.identity_coords(disp.shape[2:], disp.device)
            points = grid[None] + disp
            if matrix is not None:
                to_full = L.half_to_full(self._half(), disp.device)
                inv = torch.linalg.inv(to_full)
                points = L.apply_matrix(inv @ matrix.float() @ to_full, points)
        moved = spatial.sample_grid(seg_m, points, 'linear')
        return L.deform_loss(moved, seg_f, disp, lam, cfg.overlap_weight, cfg.overlap,
                             cfg.smooth_weight)

    def losses(self, pair: SynthPair, lam: torch.Tensor | None = None) -> dict:
        """Loss terms of one batch (tensors ``(B,)``) and the predicted transform.

        Returns a dict with ``loss``, ``overlap``, ``smooth`` (zeros for affine tasks),
        ``matrix`` (B, 4, 4) or None, and ``disp`` (half-resolution displacement) or None.
        """
        seg_m, seg_f = self.loss_maps(pair)
        out = {'matrix': None, 'disp': None}
        moving = pair.moving
        if self.linear_kind:
            matrix = self.models[self.linear_kind](pair.moving, pair.fixed)
            out['matrix'] = matrix
            if 'deform' not in self.models:
                half = self.config.loss_grid != 'full'
                to_full = L.half_to_full(self._half(), pair.fixed.device) if half else None
                moved = L.affine_warp(seg_m, matrix, to_full)
                overlap = L.overlap_mse(moved, seg_f)
                out.update(loss=overlap, overlap=overlap, smooth=torch.zeros_like(overlap))
                return out
            coords = L.apply_matrix(matrix.float(), spatial.identity_coords(self.shape, moving.device))
            moving = spatial.sample_grid(pair.moving, coords, 'linear')
        velocity = self._velocity(moving, pair.fixed, lam)
        disp = spatial.integrate_svf(velocity, self.config.integration_steps)
        total, overlap, smooth = self.deform_terms(seg_m, seg_f, disp, lam, out['matrix'])
        out.update(loss=total, overlap=overlap, smooth=smooth, disp=disp)
        return out

    def _lam(self, step: int, batch: int) -> torch.Tensor | None:
        if 'deform' not in self.models:
            return None
        gen = step_generator(self.config.seed, step, 'cpu', stream=1)
        return torch.rand((batch, 1), generator=gen).to(self.device)

    def synthesize(self, step: int) -> SynthPair:
        """The training batch of ``step`` (synthesised in this process)."""
        gen = step_generator(self.config.seed, step, self.synthesizer.maps.index.device)
        factor = curriculum_factor(step, self.config.curriculum)
        return self.synthesizer.sample(gen, self.config.batch_size, affine_factor=factor)

    def train_step(self, pair: SynthPair, step: int | None = None) -> dict:
        """One optimisation step on ``pair``; returns the logged values."""
        step = self.step if step is None else step
        pair = pair.to(self.device)
        lam = self._lam(step, pair.fixed.shape[0])
        for model in self.models.values():
            model.train()
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.losses(pair, lam)
        loss = terms['loss'].mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f'the loss is {float(loss)} at step {step}')
        loss.backward()
        self.optimizer.step()
        self._update_average()
        self.step = step + 1
        return {
            'step': self.step,
            'loss': float(loss.detach()),
            'overlap': float(terms['overlap'].detach().mean()),
            'smooth': float(terms['smooth'].detach().mean()),
            'lam': float(lam.mean()) if lam is not None else '',
            'lr': self.optimizer.param_groups[0]['lr'],
        }

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {
            'models': {k: m.state_dict() for k, m in self.models.items()},
            'model_configs': {k: m.config for k, m in self.models.items()},
            'optimizer': self.optimizer.state_dict(),
            'step': self.step,
            'wall': self.wall,
            'rng': _rng_state(),
            'config': json.loads(json.dumps(self.config.to_dict())),
        }
        if self.average is not None:
            state['average'] = self.average
        return state

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write the checkpoint atomically (``out/checkpoint.pt`` by default)."""
        path = Path(path or Path(self.config.out) / CHECKPOINT)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        LOGGER.info('checkpoint at step %d: %s', self.step, path)
        return path

    def _checkpoint_network(self, kind: str, saved: dict, path: Path):
        """The ``kind`` network of a checkpoint whose config ``saved`` differs from this run's
        network: it replaces that network when they differ only in what the run took from
        defaults (e.g. a checkpoint from before :data:`ARCH_DEFAULTS`), since a resume goes on
        with the network it holds. A difference in the architecture, the task or a setting the
        run asks for (``affine_model``, ``deform_model``) raises ``ValueError``."""
        from .networks import build_model

        ours = self.models[kind].config
        cfg = self.config
        asked = set(cfg.deform_model if kind == 'deform' else cfg.affine_model)
        asked |= {'arch', 'rigid'}
        differ = {k for k in set(saved) | set(ours)
                  if k not in INIT_KEYS and saved.get(k) != ours.get(k)}
        init = cfg.init_deform if kind == 'deform' else cfg.init_affine
        if differ & asked or init:
            raise ValueError(
                f'the checkpoint <{path}> holds a different {kind} network ({saved}) from this '
                f'run ({ours}): they differ in {sorted(differ)}'
            )
        LOGGER.log(25, 'the checkpoint holds the %s network of its start (%s): the run goes on '
                   'with it, not with the defaults of today (%s)', kind,
                   ', '.join(f'{k}={saved.get(k)}' for k in sorted(differ)),
                   ', '.join(f'{k}={ours.get(k)}' for k in sorted(differ)))
        model = build_model(saved).to(self.device).train()
        self.models[kind] = model
        return model

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        """Restore models, optimizer, step and RNG states from a checkpoint.

        Raises ``ValueError`` when this run's config differs from the checkpoint's in what
        defines the training problem (any field but :data:`RESUMABLE_CHANGES`), so that a resume
        without the run's options does not go on with another loss. The networks are compared
        as built (:meth:`_checkpoint_network`), not through ``affine_model``/``deform_model``.
        """
        path = Path(path or Path(self.config.out) / CHECKPOINT)
        state = torch.load(path, map_location='cpu', weights_only=True)
        saved_cfg = state.get('config') or {}
        ours = json.loads(json.dumps(self.config.to_dict()))  # as saved: tuples become lists
        changed = {k: (v, ours[k]) for k, v in saved_cfg.items()
                   if k in ours and k not in RESUMABLE_CHANGES and k not in MODEL_FIELDS
                   and v != ours[k]}
        if changed:
            listed = '; '.join(f'{k}: {a!r} there, {b!r} here' for k, (a, b) in changed.items())
            raise ValueError(
                f'the checkpoint <{path}> was trained with other settings ({listed}): resume '
                f'with the run\'s options (its config.json), or choose another --out'
            )
        rebuilt = False
        for kind in list(self.models):
            model = self.models[kind]
            saved = dict(state['model_configs'].get(kind) or {})
            for key, before in INIT_KEYS.items():
                if key in model.config:
                    saved.setdefault(key, before)
            if _without_init(saved) != _without_init(model.config):
                model = self._checkpoint_network(kind, saved, path)
                rebuilt = True
            # how the network started is the checkpoint's, whatever this run's default
            model.config.update({k: saved[k] for k in INIT_KEYS if k in model.config})
            model.load_state_dict(state['models'][kind], strict=True)
        if rebuilt:
            self.optimizer = self._optimizer()
        self.optimizer.load_state_dict(state['optimizer'])
        # the run's learning rate, not the checkpoint's: resuming with a lower --lr lowers it
        for group in self.optimizer.param_groups:
            if group['lr'] != self.config.lr:
                LOGGER.log(25, 'learning rate %g from here (the checkpoint ran at %g)',
                           self.config.lr, group['lr'])
                group['lr'] = self.config.lr
        if self.average is not None:
            if state.get('average') is None:
                LOGGER.log(25, 'the checkpoint holds no weight average: it starts from its weights')
                self.average = self._weights()
            else:
                self.average = _cloned(state['average'])
        self.step = int(state['step'])
        self.wall = float(state.get('wall', 0.0))
        _set_rng_state(state['rng'])

    def export_models(self, extra: dict | None = None) -> list[Path]:
        """Write each model in our weights format into ``out`` (``<kind>.pt/.json``): the weight
        average when ``config.ema`` is on."""
        written = []
        with self.averaged():
            for kind, model in self.models.items():
                written.extend(self._export_one(kind, model, extra))
        return written

    def _export_one(self, kind: str, model, extra: dict | None) -> list[Path]:
        from .weights import save_model

        cfg = self.config
        card = {
            'trained': self.step > 0,
            'space': {'voxel_size': cfg.voxel_size, 'shape': list(self.shape),
                      'divisor': model.multiple},
            'training': {
                'task': cfg.task,
                'steps': self.step,
                'seed': cfg.seed,
                'data': str(cfg.label_maps),
                'training_maps': list(self.synthesizer.maps.names),
                'validation_maps': list(self.val_maps.names) if self.val_maps else [],
                'batch_size': cfg.batch_size,
                'lr': cfg.lr,
                'synthesis': self.settings.to_dict(),
                'hardware': _hardware(self.device),
                'wall_time_s': round(self.wall, 1),
            },
        }
        if kind == 'deform':
            # trained on (D(m, f) - D(f, m)) / 2, or on D(m, f) alone
            card['training']['symmetric'] = cfg.symmetric
            card['training']['loss'] = {'overlap': cfg.overlap,
                                        'overlap_weight': cfg.overlap_weight,
                                        'smooth_weight': cfg.smooth_weight}
        if cfg.ema:
            card['training']['ema'] = cfg.ema  # the weights are the average
        card.update(extra or {})
        written = save_model(model.eval(), Path(cfg.out) / kind, card)
        model.train()
        return written

    # -- validation -------------------------------------------------------------------------

    def validation_settings(self) -> SynthesisSettings:
        """Synthesis of the held-out pairs: the task's own (:meth:`SynthesisSettings.for_task`),
        whatever the run changed for training (``config.synthesis``: more same-map pairs,
        larger warps), so that every run of a task is validated on the same pairs."""
        return SynthesisSettings.for_task(self.config.task)

    def validation_pairs(self) -> list:
        """The fixed held-out synthetic pairs of :meth:`validate` (same seed every run)."""
        if self._val_pairs is None:
            self._val_pairs = []
            if self.val_maps is not None and self.config.validation_pairs:
                synth = Synthesizer(self.val_maps.to('cpu'), self.validation_settings(),
                                    self.groups)
                for i in range(self.config.validation_pairs):
                    gen = step_generator(VALIDATION_SEED, i)
                    self._val_pairs.append(synth.sample(gen, 1))
        return self._val_pairs

    @torch.no_grad()
    def predict_coords(self, pair: SynthPair, lam: float = 0.5) -> torch.Tensor:
        """The predicted pulling map ``(B, 3, X, Y, Z)``: moving voxel of every fixed voxel."""
        for model in self.models.values():
            model.eval()
        pair = pair.to(self.device)
        batch = pair.fixed.shape[0]
        lam_t = torch.full((batch, 1), float(lam), device=self.device)
        terms = self.losses(pair, lam_t if 'deform' in self.models else None)
        if terms['disp'] is not None:
            points = self.full_coords(terms['disp'])
        else:
            points = spatial.identity_coords(self.shape, self.device)[None].expand(
                batch, -1, -1, -1, -1)
        if terms['matrix'] is not None:
            points = L.apply_matrix(terms['matrix'].float(), points)
        for model in self.models.values():
            model.train()
        return points

    def full_coords(self, disp: torch.Tensor) -> torch.Tensor:
        """The pulling map ``(B, 3, X, Y, Z)`` on the working grid of a half-resolution
        displacement ``disp`` (half-grid voxels, as :meth:`losses` returns it)."""
        batch = disp.shape[0]
        grid = spatial.identity_coords(self.shape, disp.device)[None].expand(batch, -1, -1, -1, -1)
        to_full = L.half_to_full(self._half(), disp.device)
        half = L.apply_matrix(torch.linalg.inv(to_full).expand(batch, -1, -1), grid)
        return grid + 2 * spatial.sample_grid(disp, half, 'linear', padding='border')

    def label_dice(self, pair: SynthPair, coords: torch.Tensor) -> tuple[float, float]:
        """Mean Dice of the loss labels before and after pulling the moving labels of ``pair``
        through ``coords`` (nearest neighbour)."""
        labels = self.groups.loss
        moved = spatial.sample_grid(pair.moving_labels.float(), coords, 'nearest').long()
        after = torch.nanmean(L.dice(moved, pair.fixed_labels, labels)).item()
        before = torch.nanmean(L.dice(pair.moving_labels, pair.fixed_labels, labels)).item()
        return before, after

    def validate(self) -> dict:
        """Mean Dice of the loss labels on the held-out pairs, before and after registration
        (with the weight average when ``config.ema`` is on)."""
        start = time.perf_counter()
        pairs = self.validation_pairs()
        if not pairs:
            return {}
        before, after = [], []
        with self.averaged():
            for pair in pairs:
                pair = pair.to(self.device)
                dice_before, dice_after = self.label_dice(pair, self.predict_coords(pair))
                before.append(dice_before)
                after.append(dice_after)
        return {
            'step': self.step,
            'dice': round(float(np.mean(after)), 4),
            'dice_before': round(float(np.mean(before)), 4),
            'pairs': len(pairs),
            'seconds': round(time.perf_counter() - start, 2),
        }

    # -- the loop ---------------------------------------------------------------------------

    def _batches(self):
        cfg = self.config
        if cfg.workers == 0:
            step = self.step
            while True:
                start = time.perf_counter()
                pair = self.synthesize(step)
                yield step, pair, time.perf_counter() - start
                step += 1
        stream = SynthStream(self.synthesizer, cfg.seed, start=self.step,
                             batch_size=cfg.batch_size, curriculum=cfg.curriculum)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers)
        start = time.perf_counter()
        for step, pair in loader:
            yield step, pair, time.perf_counter() - start
            start = time.perf_counter()

    def fit(self, resume: bool = False) -> dict:
        """Train up to ``config.steps``; returns a summary (``'interrupted'`` if stopped).

        With ``resume``, continue from ``out/checkpoint.pt`` when it exists.
        """
        cfg = self.config
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        ckpt = out / CHECKPOINT
        if resume and ckpt.exists():
            self.load_checkpoint(ckpt)
            LOGGER.log(25, 'resumed from %s at step %d', ckpt, self.step)
        elif ckpt.exists():
            raise FileExistsError(
                f'<{ckpt}> exists: pass --resume to continue that run, or choose another --out'
            )
        (out / 'config.json').write_text(json.dumps(cfg.to_dict(), indent=2) + '\n')
        log = _CsvLog(out / 'train_log.csv', LOG_FIELDS, self.step)
        val_log = _CsvLog(out / 'validation.csv', VAL_FIELDS, self.step)
        self._open_tensorboard(out)
        interrupt = _Interrupt()
        summary = {'start_step': self.step, 'interrupted': False}
        last_val = val_log.last()  # a resumed run's cards keep its latest held-out figures
        with interrupt.installed():
            batches = self._batches() if self.step < cfg.steps else iter(())
            for step, pair, synth_s in batches:
                if step != self.step:
                    raise RuntimeError(f'data stream at step {step}, trainer at {self.step}')
                start = time.perf_counter()
                row = self.train_step(pair, step)
                row['step_s'] = round(time.perf_counter() - start, 4)
                row['synth_s'] = round(synth_s, 4)
                self.wall += row['step_s'] + row['synth_s']
                row['wall_s'] = round(self.wall, 2)
                log.write(row)
                self._tb_scalars(row)
                if cfg.validate_every and self.step % cfg.validate_every == 0:
                    last_val = self._validate_and_log(val_log)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(ckpt)
                    self.export_models(_val_card(last_val))
                if interrupt.signal is not None:
                    summary['interrupted'] = True
                    break
                if self.step >= cfg.steps:
                    break
        if not summary['interrupted']:
            last_val = self._validate_unless_done(val_log, last_val)
        self.save_checkpoint(ckpt)
        self.export_models(_val_card(last_val))
        log.close()
        val_log.close()
        if self._tb is not None:
            self._tb.close()
        summary.update(step=self.step, validation=last_val, wall_s=round(self.wall, 1))
        return summary

    def export_checkpoint(self, extra: dict | None = None) -> dict:
        """Export the models of ``out/checkpoint.pt`` without training: the way to ship a run
        stopped between validations.

        Loads the checkpoint, validates there on the held-out maps unless ``validation.csv``
        already holds that step (the result is appended to it), and writes ``<kind>.pt/.json``
        into ``out`` with that validation and ``extra`` in the cards. Returns ``step``,
        ``validation`` and ``written`` (the paths).
        """
        out = Path(self.config.out)
        ckpt = out / CHECKPOINT
        if not ckpt.exists():
            raise FileNotFoundError(f'<{ckpt}> does not exist: there is no run to export')
        self.load_checkpoint(ckpt)
        val_log = _CsvLog(out / 'validation.csv', VAL_FIELDS, self.step)
        try:
            last = self._validate_unless_done(val_log, val_log.last())
        finally:
            val_log.close()
        written = self.export_models({**_val_card(last), **(extra or {})})
        return {'step': self.step, 'validation': last, 'written': written}

    def _validate_unless_done(self, val_log, last: dict | None) -> dict | None:
        """``last`` when it is this step's validation, else a fresh (logged) one."""
        if last is not None and last['step'] == self.step:
            return last
        return self._validate_and_log(val_log)

    def _validate_and_log(self, val_log) -> dict | None:
        result = self.validate()
        if result:
            val_log.write(result)
            LOGGER.log(25, 'validation at step %d: Dice %.4f (before %.4f)', result['step'],
                       result['dice'], result['dice_before'])
            if self._tb is not None:
                self._tb.add_scalar('validation/dice', result['dice'], result['step'])
        return result or None

    def _open_tensorboard(self, out: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._tb = None
            return
        self._tb = SummaryWriter(str(out / 'tensorboard'), purge_step=self.step)

    def _tb_scalars(self, row: dict) -> None:
        if self._tb is None:
            return
        for key in ('loss', 'overlap', 'smooth', 'step_s'):
            self._tb.add_scalar(f'train/{key}', row[key], row['step'])


def _val_card(result: dict | None) -> dict:
    return {'validation': result} if result else {}


def _hardware(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads'


def _numbers(row: dict) -> dict:
    """A CSV row with its numeric fields as int or float."""
    out = {}
    for key, value in row.items():
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except (TypeError, ValueError):
                out[key] = value
    return out


class _CsvLog:
    """Appends rows to a CSV; on resume, drops rows beyond the checkpoint's step first."""

    def __init__(self, path: Path, columns, step: int):
        self.columns = list(columns)
        rows = []
        if path.exists() and step > 0:
            with open(path, newline='') as fobj:
                rows = [r for r in csv.DictReader(fobj) if int(r['step']) <= step]
        self.fobj = open(path, 'w', newline='')  # noqa: SIM115 (closed by close())
        self.writer = csv.DictWriter(self.fobj, self.columns, extrasaction='ignore')
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.fobj.flush()
        self._last = _numbers(rows[-1]) if rows else None

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
        self.fobj.flush()
        self._last = dict(row)

    def last(self) -> dict | None:
        """The newest row (kept from before a resume, or written since), or None."""
        return self._last

    def close(self) -> None:
        self.fobj.close()
