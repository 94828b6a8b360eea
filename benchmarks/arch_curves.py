"""Learning curves of training runs: held-out Dice against steps, from their ``validation.csv``.

The affine architecture comparison (``docs/model_cards.md``) asks which network learns fastest.
Every run validates on the same 8 held-out synthetic pairs (the maps it keeps out, the fixed
validation seed), so the curves of runs on the same label maps compare step for step::

    python benchmarks/arch_curves.py training/affine-detector training/affine-encoder-grid \\
        training/affine-decomposer-cv training/affine-encoder training/affine-decomposer \\
        --at 2000 4000 8000 10000 16000 20000 \\
        --json benchmarks/results/arch_curves_s17.json --plot benchmarks/figures/arch_curves_s17.png \\
        --plot-to 30000

A run's label is its folder name and its architecture (``config.json``). The table gives, for
each step asked, the run's Dice validated at that step (``-`` where it did not validate there)
and the best Dice up to it. Nothing is recomputed: these are the figures the runs logged.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def read_run(folder: Path) -> dict:
    """A run's name, architecture, settings and validated ``(step, dice)`` rows."""
    config = json.loads((folder / 'config.json').read_text())
    with open(folder / 'validation.csv', newline='') as fobj:
        logged = list(csv.DictReader(fobj))
    if not logged:
        raise SystemExit(f'{folder}/validation.csv holds no validation')
    rows = sorted((int(r['step']), float(r['dice'])) for r in logged)
    before = {float(r['dice_before']) for r in logged}
    return {
        'run': folder.name,
        'arch': config.get('arch'),
        'affine_model': config.get('affine_model') or {},
        'lr': config.get('lr'),
        'curriculum': config.get('curriculum'),
        'dice_before': sorted(before),
        'curve': rows,
    }


def at_steps(curve: list[tuple[int, float]], steps: list[int]) -> list[dict]:
    """For each step: the Dice validated there (None if none) and the best Dice up to it (None
    when the run had not reached it)."""
    last = curve[-1][0]
    out = []
    for step in steps:
        there = [d for s, d in curve if s == step]
        upto = [d for s, d in curve if s <= step]
        out.append({
            'step': step,
            'dice': there[0] if there else None,
            'best_so_far': max(upto) if upto and step <= last else None,
        })
    return out


def _fmt(value) -> str:
    return '-' if value is None else f'{value:.3f}'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='+', type=Path, help='training run folders')
    parser.add_argument('--at', nargs='+', type=int, default=[2000, 4000, 8000, 10000],
                        metavar='STEP', help='steps of the table (default 2000 4000 8000 10000)')
    parser.add_argument('--json', type=Path, help='write the curves and the table here')
    parser.add_argument('--plot', type=Path, help='write a PNG of the curves here')
    parser.add_argument('--plot-to', type=int, metavar='STEP',
                        help='plot the curves up to this step only (default: all)')
    args = parser.parse_args(argv)

    runs = [read_run(folder) for folder in args.runs]
    for run in runs:
        run['table'] = at_steps(run['curve'], args.at)

    header = '| run | arch | validated to | ' + ' | '.join(f'{s}' for s in args.at) + ' | best |'
    print(header)
    print('|' + '---|' * (4 + len(args.at)))
    for run in runs:
        cells = [f"{_fmt(t['dice'])} ({_fmt(t['best_so_far'])})" for t in run['table']]
        best_step, best = max(run['curve'], key=lambda r: r[1])
        print(f"| {run['run']} | {run['arch']} | {run['curve'][-1][0]} | " + ' | '.join(cells)
              + f' | {best:.3f} at {best_step} |')
    print('cells: Dice validated at the step (best up to it)')

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({'script': 'benchmarks/arch_curves.py',
                                         'runs': [str(r) for r in args.runs],
                                         'at': args.at, 'results': runs}, indent=1) + '\n')
    if args.plot:
        import matplotlib

        matplotlib.use('Agg')
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for run in runs:
            curve = [r for r in run['curve'] if args.plot_to is None or r[0] <= args.plot_to]
            if not curve:
                continue
            steps, dice = zip(*curve)
            ax.plot(steps, dice, marker='.', label=f"{run['run']} ({run['arch']})")
        before = sorted({b for r in runs for b in r['dice_before']})
        if len(before) == 1:
            ax.axhline(before[0], color='grey', ls=':', label='before registration')
        ax.set_xlabel('training step')
        ax.set_ylabel('held-out Dice (8 synthetic pairs)')
        ax.set_title('Affine architectures: held-out Dice during training')
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
