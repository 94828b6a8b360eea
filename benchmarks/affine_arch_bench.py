"""Compare the three affine architectures (detector, encoder, decomposer) at matched training.

Each run directory holds a ``checkpoint.pt`` and ``config.json`` written by
``synthmorph-app train affine --arch ...`` with the same seed, data and settings (see
``training/README.md``). For each run this script reports, on the held-out label maps
(``training_seg_19/20``, never seen in training), with images synthesised as in training:

- ``dice``: mean Dice of the brain (loss) labels after the predicted affine, on cross-map pairs
  drawn with the training ranges (the run's own validation, 16 pairs here);
- ``err_R``: mean distance (mm) inside the fixed brain between the predicted and the true map,
  on same-map pairs moved by known affines only (no deformation), where each image's rotation
  about every axis is drawn from U(-R, R) degrees (shifts up to 30 mm, scaling 10 %, shear
  0.1): robustness to large rotations;
- size (parameters) and the time of one forward pass on the working grid (1 thread).

A run trained with ``--ema`` is scored with its weight average, as its validation and exports.

Run from the repository root, e.g.::

    python benchmarks/affine_arch_bench.py training/affine-detector training/affine-encoder \\
        training/affine-decomposer --pairs 16

``--weights FILE`` scores an exported model (a packaged name or a ``.pt``) in place of each run's
checkpoint, on that run's held-out maps and settings: e.g. the packaged ``affine`` after a joint
fine-tuning, which has no affine run of its own.

A script, not a timed test; figures in ``benchmarks/README.md`` and ``docs/model_cards.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from synthmorph_app.engine import losses as L
from synthmorph_app.engine import spatial
from synthmorph_app.engine.synthesis import Synthesizer, step_generator
from synthmorph_app.engine.training import TrainConfig, Trainer
from synthmorph_app.engine.weights import load_model

BENCH_SEED = 20261129


def load_run(run: Path, checkpoint: Path | None = None) -> Trainer:
    config = TrainConfig.from_dict({**json.loads((run / 'config.json').read_text()),
                                    'threads': 1, 'device': 'cpu'})
    trainer = Trainer(config)
    trainer.load_checkpoint(checkpoint or run / 'checkpoint.pt')
    return trainer


def cross_map_dice(trainer: Trainer, pairs: int) -> tuple[float, float]:
    synth = Synthesizer(trainer.val_maps, trainer.settings, trainer.groups)
    before, after = [], []
    for i in range(pairs):
        pair = synth.sample(step_generator(BENCH_SEED, i), 1)
        coords = trainer.predict_coords(pair)
        moved = spatial.sample_grid(pair.moving_labels.float(), coords, 'nearest').long()
        labels = trainer.groups.loss
        after.append(torch.nanmean(L.dice(moved, pair.fixed_labels, labels)).item())
        before.append(torch.nanmean(L.dice(pair.moving_labels, pair.fixed_labels, labels)).item())
    return float(np.mean(before)), float(np.mean(after))


def rotation_error(trainer: Trainer, rotate: float, pairs: int,
                   identity: bool = False) -> tuple[float, float]:
    """Mean (and worst-pair) error in mm inside the fixed brain on known-affine pairs
    (``identity``: of no registration, the reference)."""
    settings = trainer.settings.replace(rotate=rotate, warp_probability=0.0,
                                        same_map_probability=1.0)
    synth = Synthesizer(trainer.val_maps, settings, trainer.groups)
    errors = []
    for i in range(pairs):
        pair = synth.sample(step_generator(BENCH_SEED + 1, i), 1, truth=True)
        if identity:
            coords = spatial.identity_coords(trainer.shape)[None]
        else:
            coords = trainer.predict_coords(pair)
        dist = (coords - pair.coords).norm(dim=1) * trainer.synthesizer.voxel_size
        brain = pair.fixed_seg[:, 0] > 0
        errors.append(dist[brain].mean().item())
    return float(np.mean(errors)), float(np.max(errors))


def forward_time(trainer: Trainer, repeat: int = 5) -> float:
    model = trainer.models[trainer.linear_kind].eval()
    x = torch.rand(1, 1, *trainer.shape)
    with torch.no_grad():
        model(x, x)
        start = time.perf_counter()
        for _ in range(repeat):
            model(x, x)
    return (time.perf_counter() - start) / repeat


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='+', type=Path, help='training run directories')
    parser.add_argument('--pairs', type=int, default=16, help='pairs per figure (default 16)')
    parser.add_argument('--rotations', default='0,15,30,45',
                        help='per-image rotation ranges, degrees (default 0,15,30,45)')
    parser.add_argument('--checkpoint-name', default='checkpoint.pt',
                        help='checkpoint file inside each run (default checkpoint.pt)')
    parser.add_argument('--weights', metavar='FILE',
                        help="score this exported model (a packaged name or our .pt) in each "
                             "run's setting instead of the run's own weights")
    parser.add_argument('--json', type=Path, help='write the figures as JSON')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rotations = [float(r) for r in args.rotations.split(',')]
    rows = []
    reference = load_run(args.runs[0], args.runs[0] / args.checkpoint_name)
    row = {'run': '-', 'arch': 'no registration', 'step': 0, 'params': 0, 'forward_s': 0.0}
    row['dice_before'] = row['dice'] = round(cross_map_dice(reference, args.pairs)[0], 4)
    for rot in rotations:
        mean, worst = rotation_error(reference, rot, args.pairs, identity=True)
        row[f'err_{rot:g}'], row[f'worst_{rot:g}'] = round(mean, 2), round(worst, 2)
    rows.append(row)
    print(json.dumps(row), flush=True)
    for run in args.runs:
        trainer = load_run(run, run / args.checkpoint_name)
        model = trainer.models[trainer.linear_kind]
        weights = 'average' if trainer.average is not None else 'raw'
        step = trainer.step
        if args.weights:
            exported, card = load_model(args.weights, trainer.linear_kind)
            model.load_state_dict(exported.state_dict())
            trainer.average = None
            weights, step = card['path'], card.get('training', {}).get('steps', 0)
        # a run with a weight average (--ema) is scored with it, as its validation and exports
        with trainer.averaged():
            before, after = cross_map_dice(trainer, args.pairs)
            row = {'run': str(run), 'arch': trainer.config.arch, 'step': step,
                   'weights': weights,
                   'params': sum(p.numel() for p in model.parameters()),
                   'forward_s': round(forward_time(trainer), 4),
                   'dice_before': round(before, 4), 'dice': round(after, 4)}
            for rot in rotations:
                mean, worst = rotation_error(trainer, rot, args.pairs)
                row[f'err_{rot:g}'] = round(mean, 2)
                row[f'worst_{rot:g}'] = round(worst, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    head = ['arch', 'step', 'params', 'forward (s)', 'Dice before', 'Dice after',
            *[f'error {r:g} deg (mm)' for r in rotations]]
    print('\n| ' + ' | '.join(head) + ' |')
    print('|' + '---|' * len(head))
    for r in rows:
        cells = [r['arch'], r['step'], f"{r['params']:,}", r['forward_s'], r['dice_before'],
                 r['dice'], *[f"{r[f'err_{x:g}']} (worst {r[f'worst_{x:g}']})" for x in rotations]]
        print('| ' + ' | '.join(str(c) for c in cells) + ' |')
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
