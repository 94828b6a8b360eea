"""Throughput of registrations sharing one device: K worker processes at once.

The BIDS-App lets one registration use the GPU at a time (session 34: 12 T1w images in 96 s
on an H200, against 37 s on the machine's 16 CPU cores). This measures what sharing would give
before the app is changed: the 12 whole-head T1w images of ``bids/`` (2 mm) registered onto the
2 mm MNI152NLin6Asym T1w, as the BIDS-App's default job does (``register -m joint``, default
refinement), by K processes at a time (``spawn``, each on the device), for each K asked for.
Prints images per minute, the wall time and each registration's time.

Usage (from the repository root)::

    python benchmarks/gpu_share_bench.py --device cuda --jobs 1 2 4
    python benchmarks/gpu_share_bench.py --device cpu --jobs 1 2 --images 4   # a check here
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time

import _common as C

FIXED = C.DATA / 'templateflow' / 'tpl-MNI152NLin6Asym' / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz'


def _one(args) -> float:
    path, device, threads = args
    import torch

    torch.set_num_threads(threads)
    from synthmorph_app.engine.register import register
    from synthmorph_app.io.images import load_image

    start = time.perf_counter()
    register(load_image(path), load_image(FIXED), mode='joint', device=device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda', choices=('cpu', 'cuda'))
    parser.add_argument('--jobs', type=int, nargs='+', default=[1, 2, 4],
                        help='registrations at a time (default 1 2 4)')
    parser.add_argument('--images', type=int, default=12, help='how many of the T1w (12)')
    parser.add_argument('--threads', type=int, default=1, help='CPU threads per process (1)')
    args = parser.parse_args(argv)
    images = sorted((C.DATA / 'bids').glob('sub-[0-9]*/anat/sub-*_T1w.nii.gz'))[:args.images]
    ctx = mp.get_context('spawn')
    for jobs in args.jobs:
        with ctx.Pool(jobs) as pool:
            pool.map(_one, [(images[0], args.device, args.threads)] * jobs)  # warm-up
            start = time.perf_counter()
            times = pool.map(_one, [(p, args.device, args.threads) for p in images])
            wall = time.perf_counter() - start
        print(f'{jobs} at a time on {args.device}: {len(images)} images in {wall:.1f} s '
              f'({60 * len(images) / wall:.1f} per minute); each '
              f'{min(times):.1f}-{max(times):.1f} s', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
