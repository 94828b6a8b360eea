"""Summarise a training run's logs: steps, time per step and pair, loss, held-out Dice.

Usage: ``python benchmarks/gpu_train_summary.py RUN_DIR`` (a ``synthmorph-app train --out``
folder). Used by ``benchmarks/gpu_check.sh``; works for any run.
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path


def summary(run: Path) -> str:
    log = run / 'train_log.csv'
    if not log.exists():
        return f'{run}: no train_log.csv (the run did not start)'
    rows = list(csv.DictReader(log.open()))
    if not rows:
        return f'{run}: no step logged'
    skip = rows[5:] or rows  # the first steps include CUDA and cuDNN warm-up
    step_s = statistics.median(float(r['step_s']) for r in skip)
    synth_s = statistics.median(float(r['synth_s']) for r in skip)
    n = min(100, len(rows) // 2) or 1
    first = statistics.mean(float(r['overlap']) for r in rows[:n])
    last = statistics.mean(float(r['overlap']) for r in rows[-n:])
    head = (f'{run.name}: {len(rows)} steps; median {step_s:.4f} s per step + {synth_s:.4f} s '
            f'synthesis; overlap loss {first:.4f} (first {n}) -> {last:.4f} (last {n})')
    lines = [head]
    val = run / 'validation.csv'
    if val.exists():
        for r in csv.DictReader(val.open()):
            lines.append(f'  held-out Dice at step {r["step"]}: {r["dice"]} '
                         f'(before {r["dice_before"]}, {r["pairs"]} pairs, {r["seconds"]} s)')
    return '\n'.join(lines)


if __name__ == '__main__':
    for arg in sys.argv[1:]:
        print(summary(Path(arg)))
