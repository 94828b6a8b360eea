#!/usr/bin/env python
"""How long a BIDS-App run over many subjects takes to start registering.

Builds a dataset of N subjects whose T1w and FLAIR are links to the packaged demo images (the
FLAIR goes through the T1w, as by default), runs ``synthmorph-app BIDS OUT participant
--contrasts T1w FLAIR`` with the networks only (``--refine 0``, so the registrations are short
and the overhead shows), and reports the seconds until the workflow starts (planning,
building) and until the first registration ends, then stops the run with SIGTERM.

Usage (from the repository root)::

    python benchmarks/bids_scale_bench.py --subjects 40 300 --json results/bids_scale_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / 'synthmorph_app' / 'data' / 'demo'


def make_dataset(root: Path, subjects: int) -> None:
    root.mkdir(parents=True)
    (root / 'dataset_description.json').write_text(
        (DEMO / 'dataset_description.json').read_text())
    for i in range(1, subjects + 1):
        anat = root / f'sub-{i:03d}' / 'anat'
        anat.mkdir(parents=True)
        (anat / f'sub-{i:03d}_T1w.nii.gz').symlink_to(DEMO / 'sub-01/anat/sub-01_T1w.nii.gz')
        (anat / f'sub-{i:03d}_FLAIR.nii.gz').symlink_to(DEMO / 'sub-02/anat/sub-02_T1w.nii.gz')


def time_to_first(subjects: int, nprocs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_dataset(tmp / 'bids', subjects)
        start = time.time()
        proc = subprocess.Popen(
            [sys.executable, '-m', 'synthmorph_app', str(tmp / 'bids'), str(tmp / 'out'),
             'participant', '--contrasts', 'T1w', 'FLAIR', '-w', str(tmp / 'work'), '--nprocs',
             str(nprocs), '--omp-nthreads', '1', '--refine', '0', '--no-figures', '-v'],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
        marks = {'subjects': subjects, 'images': 2 * subjects}
        for line in proc.stdout:
            if 'running synthmorph_wf' in line:
                marks['workflow_starts_s'] = round(time.time() - start, 1)
            if f'[1/{2 * subjects}]' in line and 'registered' in line:
                marks['first_registration_s'] = round(time.time() - start, 1)
                break
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
        return marks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--subjects', type=int, nargs='+', default=[40, 300])
    parser.add_argument('--nprocs', type=int, default=2)
    parser.add_argument('--json', type=Path)
    args = parser.parse_args(argv)
    rows = [time_to_first(n, args.nprocs) for n in args.subjects]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
