"""One registration of two T1w of ``../shared/data/bids``, one thread, then exit: a command for
``farm-bench``, which times whole processes, e.g. ours against greedy, turn about::

    farm-bench -n 5 --timeout 900 --vs "python benchmarks/pair_once.py greedy 01 02" \\
        -- python benchmarks/pair_once.py ours 01 02

``ours`` is ``register`` with its defaults (joint, the default refinement), greedy as
``refine_bench.py`` runs it (``_common.run_greedy``: affine, then deformable, NCC 2x2x2).
``--repo DIR`` imports ``synthmorph_app`` from another checkout (a ``git worktree`` of an
earlier commit) to time two versions of the engine against each other. Prints the
registration's own time; the process also imports PyTorch (about 3 s here; greedy 0.2 s).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('method', choices=('ours', 'greedy'))
    parser.add_argument('moving', help='moving subject (01 ... 12)')
    parser.add_argument('fixed', help='fixed subject (01 ... 12)')
    parser.add_argument('--repo', type=Path, help='checkout to import synthmorph_app from')
    args = parser.parse_args(argv)
    if args.repo is not None:
        sys.path.insert(0, str(args.repo.resolve()))
    import _common as C

    C.pin_threads(1)
    moving, fixed = (C.DATA / 'bids' / f'sub-{s}' / 'anat' / f'sub-{s}_T1w.nii.gz'
                     for s in (args.moving, args.fixed))
    if args.method == 'greedy':
        start = time.perf_counter()
        C.run_greedy(str(moving), str(fixed), 'NCC 2x2x2', 1)
        print(f'greedy {time.perf_counter() - start:.2f} s')
        return 0
    import torch

    import synthmorph_app
    from synthmorph_app.engine.register import register
    from synthmorph_app.io.images import load_image

    if args.repo is not None and not synthmorph_app.__file__.startswith(str(args.repo.resolve())):
        parser.error(f'synthmorph_app came from {synthmorph_app.__file__}, not {args.repo}')
    torch.set_num_threads(1)
    m, f = load_image(moving), load_image(fixed)
    start = time.perf_counter()
    result = register(m, f, mode='joint')
    stages = ', '.join(f'{k} {v:.2f}' for k, v in result.timings.items())
    print(f'ours {time.perf_counter() - start:.2f} s ({stages})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
