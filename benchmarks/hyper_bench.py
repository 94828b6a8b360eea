"""Hypernetwork lambda sweep: one deformable model, no refinement, several lambdas.

The deformable network takes the regularisation weight lambda as an input (SynthMorph's
hypernetwork). This script feeds it lambdas in [0, 1] on held-out synthetic pairs (drawn, as the
training's validation does, from the label maps the training never sees, ``training_seg_19`` and
``training_seg_20``) and reports, per lambda, the mean Dice of the brain labels of the loss, and
the SD of the log Jacobian determinant and % folding of the predicted transform inside the fixed
brain. A working hypernetwork shows a spread that falls as lambda grows. The network alone, no
test-time refinement: ``benchmarks/lambda_bench.py`` sweeps ``register``'s lambda on real pairs.

Run from the repository root, e.g.::

    python benchmarks/hyper_bench.py --model training/deform/deform.pt \\
        --json benchmarks/results/hyper_bench.json --plot benchmarks/figures/hyper_lambda.png

``--model deform`` sweeps the packaged model. A script, not a timed test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import _common as C

LAMBDAS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def log_jacobian_stats(coords, mask) -> tuple[float, float]:
    """SD of log det J and % of voxels with det J <= 0 of a voxel pulling map (1, 3, ...)."""
    import torch

    grads = torch.stack(torch.gradient(coords[0], dim=(1, 2, 3)), dim=1)  # (3, 3, X, Y, Z)
    jac = grads.permute(2, 3, 4, 0, 1).double()
    det = torch.linalg.det(jac)[mask]
    folding = float((det <= 0).double().mean()) * 100
    return float(torch.log(det.clamp(min=1e-3)).std()), folding


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default=str(C.REPO / 'training' / 'deform' / 'deform.pt'),
                        help='deformable model (.pt or a packaged name; default '
                             'training/deform/deform.pt)')
    parser.add_argument('--label-maps', default=str(C.DATA / 'label_maps'),
                        help='label-map folder (default ../shared/data/label_maps)')
    parser.add_argument('--pairs', type=int, default=8, help='held-out pairs (default 8)')
    parser.add_argument('--lambdas', default=','.join(map(str, LAMBDAS)),
                        help='comma-separated lambdas (default 0,0.1,0.3,0.5,0.7,0.9,1)')
    parser.add_argument('--one-way', action='store_true',
                        help='velocity D(m, f) alone, for a model trained that way whose card '
                             "predates the card's 'symmetric' entry (default: as the card says, "
                             'else (D(m, f) - D(f, m)) / 2 as register does)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (default 1)')
    parser.add_argument('--json', type=Path, default=Path('hyper_bench.json'),
                        help='where to write all figures (default hyper_bench.json)')
    parser.add_argument('--plot', type=Path, help='write the plot (PNG) here')
    args = parser.parse_args(argv)
    C.pin_threads(args.threads)
    import torch

    from synthmorph_app.engine import losses as L
    from synthmorph_app.engine import spatial
    from synthmorph_app.engine.training import TrainConfig, Trainer
    from synthmorph_app.engine.weights import load_model

    torch.set_num_threads(args.threads)
    _, card = load_model(args.model, 'deform')
    space = card.get('space', {})
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            task='deform', label_maps=args.label_maps, out=out, init_deform=args.model,
            validation_pairs=args.pairs, threads=args.threads,
            voxel_size=float(space.get('voxel_size', 4.0)),
            shape=int(space.get('shape', [64])[0]),
            symmetric=not args.one_way and card.get('training', {}).get('symmetric', True),
        )
        trainer = Trainer(config)
        pairs = trainer.validation_pairs()
    if not pairs:
        parser.error(f'no held-out label maps in {args.label_maps}')
    labels = trainer.groups.loss
    lams = [float(v) for v in args.lambdas.split(',')]
    rows = []
    for i, pair in enumerate(pairs):
        before = torch.nanmean(L.dice(pair.moving_labels, pair.fixed_labels, labels)).item()
        brain = torch.isin(pair.fixed_labels[0, 0], torch.as_tensor(labels))
        for lam in lams:
            coords = trainer.predict_coords(pair, lam)
            moved = spatial.sample_grid(pair.moving_labels.float(), coords, 'nearest').long()
            dice = torch.nanmean(L.dice(moved, pair.fixed_labels, labels)).item()
            sd, fold = log_jacobian_stats(coords, brain)
            rows.append({'pair': i, 'lambda': lam, 'dice': dice, 'dice_before': before,
                         'sd_logj': sd, 'fold_brain': fold})
    summary = C.summarise(rows, ['dice', 'dice_before', 'sd_logj', 'fold_brain'], by='lambda')
    print(f'model {args.model} ({card.get("training", {}).get("steps", "?")} steps), '
          f'{len(pairs)} held-out synthetic pairs')
    print(C.markdown(summary, [('lambda', 'lambda', 1), ('pairs', 'pairs', 0),
                               ('dice_before', 'Dice before', 3), ('dice', 'Dice', 3),
                               ('sd_logj', 'SD log J', 3), ('fold_brain', 'folding %', 3)]))
    C.write_json(args.json, {'model': args.model, 'card': card, 'rows': rows,
                             'summary': summary, 'environment': C.environment(),
                             'command': 'python benchmarks/hyper_bench.py ' + ' '.join(
                                 argv if argv is not None else sys.argv[1:])})
    if args.plot:
        steps = card.get('training', {}).get('steps', '?')
        C.plot_dice_and_spread(summary, args.plot, 'lambda (hypernetwork input)',
                               'mean Dice (brain labels)',
                               f'deformable hypernetwork at step {steps}, no refinement,\n'
                               f'{len(pairs)} held-out synthetic pairs', fontsize=9)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
