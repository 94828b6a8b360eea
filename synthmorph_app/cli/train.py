"""``synthmorph-app train`` and ``synthmorph-app synth``: training on synthetic pairs.

``add_train_parser``/``add_synth_parser`` register the subcommands on ``synthmorph-app``'s
subparsers; ``run_train``/``run_synth`` run them and return an exit code. ``main(argv)`` is a
stand-alone entry point with just these two commands (``python -m synthmorph_app.cli.train``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .parser import HelpFormatter, _at_least, _positive_float

LOGGER = logging.getLogger('synthmorph_app.cli.train')

TASKS = ('affine', 'rigid', 'deform', 'joint')

TRAIN_EPILOG = """
outputs in --out: checkpoint.pt (models, optimizer, step, RNG states, config), train_log.csv
(loss and step time per step), validation.csv (mean Dice of the brain labels on pairs from the
held-out maps training_seg_19 and training_seg_20), config.json, and the models as <kind>.pt +
<kind>.json (model card) for register -w. Ctrl-C or SIGTERM stops after the current step and
saves a checkpoint; --resume continues exactly where it stopped. Resume with the run's options
(its config.json): --steps, --lr, --threads, --device, the checkpoint and validation intervals and
--ema may change, anything else (loss, grids, synthesis, seed, a network setting asked for in
--config that differs from the checkpoint's) refuses to resume. A resume goes on with the networks
its checkpoint holds, even where today's defaults differ.

examples:
  synthmorph-app train affine --label-maps ../shared/data/label_maps --out runs/affine \\
      --steps 20000 --checkpoint-every 500 --validate-every 1000
  synthmorph-app train deform --label-maps ../shared/data/label_maps --out runs/deform --resume
  synthmorph-app train affine --label-maps ../shared/data/label_maps --out runs/affine \\
      --export-only --description 'our affine detector, step 16000'
  synthmorph-app train joint --label-maps maps --out runs/joint \\
      --init-affine runs/affine/affine.pt --init-deform runs/deform/deform.pt
"""


_non_negative_int = _at_least(0)
#: ``--label-table`` of train and synth.
LABEL_TABLE_HELP = (
    'label groups of the label maps: a TSV with columns label, name, loss (1: an anatomical '
    'label the overlap loss counts) and removable (1: a non-brain label the synthesis may '
    'erase); default: the packaged FreeSurfer table (synthmorph_app/data/labels). Maps of '
    'another numbering need their own'
)


def _json_object(text: str) -> dict:
    """A JSON object given inline or as a file path."""
    path = Path(text)
    try:
        data = json.loads(path.read_text() if path.is_file() else text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f'not a JSON object or JSON file: {err}') from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError('must be a JSON object ({...})')
    return data


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'train',
        help='train a network on images synthesised from label maps',
        description=(
            'Train an affine, rigid, deformable (hypernetwork) or joint SynthMorph model on '
            'image pairs synthesised on the fly from label maps, with random contrasts, '
            'artefacts and spatial transforms. Seeded and resumable.'
        ),
        epilog=TRAIN_EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument('task', choices=TASKS, help='what to train (joint: affine then deformable)')
    p.add_argument('--label-maps', required=True, metavar='DIR',
                   help='folder of label maps (NIfTI/MGZ, FreeSurfer labels)')
    p.add_argument('--out', required=True, metavar='DIR', help='output folder')
    p.add_argument('--label-table', metavar='TSV', default=None, help=LABEL_TABLE_HELP)
    p.add_argument('--arch', default='detector', choices=('detector', 'encoder', 'decomposer'),
                   help='affine/rigid architecture (default: detector). The encoder pools '
                        'its features on a 4^3 grid (pool_grid 4) and the decomposer reads a '
                        'MIND cost volume (cost_volume 1): without them neither learnt anything '
                        'on CPU (docs/model_cards.md). A resumed run goes on with the network '
                        'its checkpoint holds')
    p.add_argument('--steps', type=_non_negative_int, default=10000,
                   help='total optimisation steps (default 10000)')
    p.add_argument('--resume', action='store_true',
                   help='continue from --out/checkpoint.pt if it exists')
    p.add_argument('--export-only', action='store_true',
                   help='do not train: write the models of --out/checkpoint.pt with their cards, '
                        'validated at that step (how an interrupted run is shipped)')
    p.add_argument('--description', metavar='TEXT',
                   help="with --export-only: the models' description in their cards")
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'), help='(default cpu)')
    p.add_argument('--checkpoint-every', type=_non_negative_int, default=500, metavar='N',
                   help='steps between checkpoints (default 500; 0: only at the end)')
    p.add_argument('--validate-every', type=_non_negative_int, default=1000, metavar='N',
                   help='steps between validations (default 1000; 0: only at the end)')
    p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    p.add_argument('--lr', type=_positive_float, default=1e-4,
                   help='Adam learning rate (default 1e-4)')
    p.add_argument('--batch-size', type=_non_negative_int, default=1, help='(default 1)')
    p.add_argument('--voxel-size', type=_positive_float, default=4.0, metavar='MM',
                   help='voxel size of the working grid (default 4 mm)')
    p.add_argument('--shape', type=_non_negative_int, default=64, metavar='N',
                   help='working grid of N^3 voxels (default 64: 256 mm at 4 mm)')
    p.add_argument('--init-affine', metavar='MODEL',
                   help='start the affine/rigid network from these weights (.pt or name); a rigid '
                        'run may start from an affine model (its network, with the rigid fit)')
    p.add_argument('--init-deform', metavar='MODEL',
                   help='start the deformable network from these weights (.pt or name)')
    p.add_argument('--curriculum', type=_non_negative_int, default=0, metavar='N',
                   help='grow the affine ranges of the synthesis from 20%% to 100%% over the '
                        'first N steps (default 0: full ranges from the start)')
    p.add_argument('--ema', type=float, default=0.0, metavar='DECAY',
                   help='validate and export an exponential moving average of the weights '
                        '(e.g. 0.999: about the last 1000 steps), which wander less than the '
                        'weights of one step; default 0: off')
    p.add_argument('--workers', type=_non_negative_int, default=0,
                   help='DataLoader workers synthesising on the CPU (default 0: in process)')
    p.add_argument('--threads', type=_non_negative_int, default=None,
                   help='torch CPU threads (default: torch decides; on a machine shared with '
                        'other jobs 1 is often faster than more)')
    p.add_argument('--config', type=_json_object, default=None, metavar='JSON',
                   help='more settings as a JSON object or file: any field of '
                        'engine.training.TrainConfig, e.g. \'{"synthesis": {"rotate": 20}, '
                        '"affine_model": {"enc": [16, 32]}}\'')
    p.add_argument('-v', '--verbose', action='store_true', help='log progress')
    return p


def add_synth_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'synth',
        help='write example synthetic training pairs (NIfTI and a PNG montage)',
        description=(
            'Synthesise N training pairs from label maps, as training sees them, and write '
            'each pair (fixed and moving images and label maps, NIfTI on the working grid) and '
            'a PNG montage to look at.'
        ),
    )
    p.add_argument('--label-maps', required=True, metavar='DIR', help='folder of label maps')
    p.add_argument('--out', required=True, metavar='DIR', help='output folder')
    p.add_argument('--label-table', metavar='TSV', default=None, help=LABEL_TABLE_HELP)
    p.add_argument('-n', type=_non_negative_int, default=4, dest='count',
                   help='number of pairs (default 4)')
    p.add_argument('--task', choices=TASKS, default='affine',
                   help='synthesis settings of this training task (default affine)')
    p.add_argument('--voxel-size', type=_positive_float, default=4.0, metavar='MM')
    p.add_argument('--shape', type=_non_negative_int, default=64, metavar='N')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--maps', type=_non_negative_int, default=4, metavar='M',
                   help='use the first M label maps (default 4; loading takes ~1 s each)')
    p.add_argument('--synthesis', type=_json_object, default=None, metavar='JSON',
                   help='overrides of the synthesis settings, e.g. \'{"shapes_probability": 1}\'')
    p.add_argument('-v', '--verbose', action='store_true', help='log progress')
    return p


def run_train(args) -> int:
    from dataclasses import fields

    from ..engine.training import TrainConfig, Trainer

    extra = dict(args.config or {})
    for key in ('task', 'label_maps', 'out'):
        extra.pop(key, None)
    config_ema = extra.pop('ema', 0.0)
    ema = args.ema or config_ema  # --ema wins over --config's
    # TrainConfig fields with a flag of their own (--config may not set them too)
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if hasattr(args, f.name) and f.name not in ('task', 'label_maps', 'out', 'ema')}
    doubled = sorted(set(flags) & set(extra))
    if doubled:
        named = ', '.join(f"{k!r} (--{k.replace('_', '-')})" for k in doubled)
        print(f'synthmorph-app train: error: --config sets {named}, which has its own flag: '
              'give it once, as the flag', file=sys.stderr)
        return 2
    try:
        config = TrainConfig(
            task=args.task, label_maps=args.label_maps, out=args.out, ema=ema, **flags, **extra,
        )
    except TypeError as err:
        print(f'synthmorph-app train: error: --config: {err}', file=sys.stderr)
        return 2
    except ValueError as err:
        print(f'synthmorph-app train: error: {err}', file=sys.stderr)
        return 2
    if args.description and not args.export_only:
        print('synthmorph-app train: error: --description goes with --export-only',
              file=sys.stderr)
        return 2
    try:
        trainer = Trainer(config)
        if args.export_only:
            extra = {'description': args.description} if args.description else None
            return _report_export(trainer.export_checkpoint(extra))
        summary = trainer.fit(resume=args.resume)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f'synthmorph-app train: error: {err}', file=sys.stderr)
        return 1
    val = summary.get('validation') or {}
    text = f'step {summary["step"]}'
    if val:
        text += (f'; validation Dice at step {val["step"]}: {val["dice"]:.4f} (before '
                 f'registration {val["dice_before"]:.4f})')
    if summary['interrupted']:
        print(f'synthmorph-app train: interrupted at {text}; checkpoint saved in {args.out} '
              '(continue with --resume)', file=sys.stderr)
        return 130
    print(f'synthmorph-app train: done at {text}; models in {args.out}')
    return 0


def _report_export(result: dict) -> int:
    val = result['validation']
    text = f'exported step {result["step"]}'
    if val:
        text += (f' (validation Dice {val["dice"]:.4f}, before registration '
                 f'{val["dice_before"]:.4f})')
    files = ', '.join(str(path) for path in result['written'])
    print(f'synthmorph-app train: {text}: {files}')
    return 0


def run_synth(args) -> int:
    import nibabel as nb
    import numpy as np

    from ..engine.losses import load_label_groups
    from ..engine.synthesis import (
        SynthesisSettings,
        Synthesizer,
        label_map_paths,
        load_label_maps,
        step_generator,
    )

    try:
        settings = SynthesisSettings.for_task(args.task, **(args.synthesis or {}))
    except (TypeError, ValueError) as err:
        print(f'synthmorph-app synth: error: --synthesis: {err}', file=sys.stderr)
        return 2
    try:
        train, _ = label_map_paths(args.label_maps, validation=())
    except FileNotFoundError as err:
        print(f'synthmorph-app synth: error: {err}', file=sys.stderr)
        return 1
    try:
        groups = load_label_groups(args.label_table)
        maps = load_label_maps(train[: max(1, args.maps)], args.voxel_size, args.shape, groups)
    except (FileNotFoundError, ValueError) as err:
        print(f'synthmorph-app synth: error: {err}', file=sys.stderr)
        return 1
    synth = Synthesizer(maps, settings, groups)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = {name: i for i, name in enumerate(maps.names)}
    rows = []
    for k in range(args.count):
        pair = synth.sample(step_generator(args.seed, k))
        info = pair.info[0]
        for role in ('fixed', 'moving'):
            geom = maps.geometries[names.get(info[role], 0)]
            image = getattr(pair, role)[0, 0].cpu().numpy().astype(np.float32)
            labels = getattr(pair, f'{role}_labels')[0, 0].cpu().numpy().astype(np.int16)
            nb.save(nb.Nifti1Image(image, geom.affine), out / f'pair{k:03d}_{role}.nii.gz')
            nb.save(nb.Nifti1Image(labels, geom.affine),
                    out / f'pair{k:03d}_{role}_labels.nii.gz')
        rows.append((pair.fixed[0, 0].cpu().numpy(), pair.moving[0, 0].cpu().numpy(), info))
        LOGGER.info('pair %d: fixed from %s, moving from %s', k, info['fixed'], info['moving'])
    png = _montage(rows, out / 'montage.png')
    print(f'synthmorph-app synth: wrote {args.count} pairs and {png} in {out}')
    return 0


def _montage(rows, path: Path) -> Path:
    """One row per pair: the middle slice along each axis of the fixed and moving images."""
    import numpy as np

    try:
        import matplotlib
    except ImportError:
        LOGGER.warning('matplotlib is not installed: no montage written')
        return path
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 6, figsize=(12, 2.1 * len(rows)), squeeze=False)
    for r, (fixed, moving, info) in enumerate(rows):
        for c, (name, vol) in enumerate((('fixed', fixed), ('moving', moving))):
            for axis in range(3):
                ax = axes[r, 3 * c + axis]
                ax.imshow(np.take(vol, vol.shape[axis] // 2, axis=axis).T, cmap='gray',
                          vmin=0, vmax=1, origin='upper')
                ax.set_xticks([])
                ax.set_yticks([])
                if axis == 0:
                    ax.set_title(f'{r}: {name} ({info[name]})', fontsize=7, loc='left')
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='synthmorph-app', description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    add_train_parser(sub)
    add_synth_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``train`` or ``synth`` (stand-alone entry point; returns an exit code)."""
    args = build_parser().parse_args(argv)
    logging.addLevelName(25, 'IMPORTANT')
    logging.basicConfig(
        level=logging.INFO if args.verbose else 25,
        format='%(asctime)s %(name)s %(levelname)s: %(message)s',
        datefmt='%H:%M:%S',
        stream=sys.stderr,
    )
    logging.captureWarnings(True)
    return run_train(args) if args.command == 'train' else run_synth(args)

if __name__ == '__main__':  # pragma: no cover
    raise SystemExit(main())
