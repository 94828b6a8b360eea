"""What the deformable training loss asks for, and what the untrained network can learn.

Two checks on the held-out synthetic pairs of a ``train deform`` run (same synthesis, grid and
loss as training):

1. **The loss's own optimum.** For each lambda, a free half-resolution velocity per pair is
   optimised directly (Adam, ``--iterations`` steps) on the training loss
   ``(1 - lam) * w * overlap + lam * smoothness``. Its Dice says how much a network trained on
   that loss could gain; if it did not beat "no registration", the loss would be at fault.
2. **Gradient scale at initialisation.** The mean absolute gradient of every parameter of a
   freshly built network after one loss evaluation, against Adam's ``eps`` (1e-8): gradients
   far below it make Adam's steps far shorter than the learning rate.

Run from the repository root (about a minute on one thread)::

    python benchmarks/deform_loss_check.py
    python benchmarks/deform_loss_check.py --pairs 4 --json benchmarks/results/deform_loss_check.json

This is a script, not a test. See ``training/README.md`` for what it showed.
"""

from __future__ import annotations

import argparse
import json
import sys

import _common as C
import numpy as np


def loss_optimum(trainer, pair, lam: float, iterations: int, lr: float) -> dict:
    """Dice and loss terms of a free velocity optimised on the training loss of ``pair``."""
    import torch

    from synthmorph_app.engine import spatial

    seg_m, seg_f = trainer.loss_maps(pair)
    half = [s // 2 for s in pair.fixed.shape[2:]]
    velocity = torch.zeros(1, 3, *half, requires_grad=True)
    opt = torch.optim.Adam([velocity], lr=lr)
    lam_t = torch.tensor([[lam]])
    for _ in range(iterations):
        disp = spatial.integrate_svf(velocity, trainer.config.integration_steps)
        total, overlap, smooth = trainer.deform_terms(seg_m, seg_f, disp, lam_t)
        opt.zero_grad()
        total.sum().backward()
        opt.step()
    with torch.no_grad():
        before, after = trainer.label_dice(pair, trainer.full_coords(disp.detach()))
    return {'dice_before': before, 'dice': after, 'overlap': float(overlap.detach()),
            'smooth': float(smooth.detach())}


def gradient_scale(trainer, pair, lam: float = 0.3) -> dict:
    """Median, min and max over parameters of the mean absolute gradient at initialisation."""
    import torch

    terms = trainer.losses(pair, torch.tensor([[lam]]))
    terms['loss'].mean().backward()
    model = trainer.models['deform']
    grads = {n: float(p.grad.abs().mean()) for n, p in model.named_parameters()
             if p.grad is not None}
    values = np.array(list(grads.values()))
    model.zero_grad(set_to_none=True)
    return {'median': float(np.median(values)), 'min': float(values.min()),
            'max': float(values.max()), 'below_adam_eps': int((values < 1e-8).sum()),
            'parameters': len(values)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--label-maps', default=str(C.DATA / 'label_maps'))
    parser.add_argument('--pairs', type=int, default=3, help='held-out pairs (default 3)')
    parser.add_argument('--lambdas', type=float, nargs='+', default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument('--iterations', type=int, default=150)
    parser.add_argument('--lr', type=float, default=0.05, help='Adam step of the free field')
    parser.add_argument('--symmetric', action='store_true',
                        help="the network's velocity as (D(m, f) - D(f, m)) / 2")
    parser.add_argument('--config', default='{}',
                        help='JSON overrides of the training config, e.g. '
                             '\'{"overlap": "dice", "overlap_weight": 1, "loss_grid": "full"}\'')
    parser.add_argument('--json', default=None, help='output JSON')
    args = parser.parse_args(argv)
    C.pin_threads(1)
    import tempfile

    from synthmorph_app.engine.training import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(TrainConfig(task='deform', label_maps=args.label_maps, out=tmp,
                                      threads=1, validation_pairs=args.pairs,
                                      symmetric=args.symmetric, **json.loads(args.config)))
    pairs = trainer.validation_pairs()
    rows = []
    for lam in args.lambdas:
        per_pair = [loss_optimum(trainer, p, lam, args.iterations, args.lr) for p in pairs]
        row = {'lambda': lam, **{k: float(np.mean([r[k] for r in per_pair]))
                                 for k in per_pair[0]}}
        rows.append(row)
        print(f"lambda {lam}: Dice {row['dice_before']:.3f} -> {row['dice']:.3f}, overlap "
              f"{row['overlap']:.5f}, smoothness {row['smooth']:.2e}", flush=True)
    grads = gradient_scale(trainer, pairs[0])
    print(f"untrained network, mean |gradient| per parameter: median {grads['median']:.1e} "
          f"(min {grads['min']:.1e}, max {grads['max']:.1e}); {grads['below_adam_eps']} of "
          f"{grads['parameters']} below Adam's eps 1e-8")
    if args.json:
        C.write_results(args.json, 'deform_loss_check', argv, rows, gradients=grads)
    return 0


if __name__ == '__main__':
    sys.exit(main())
