"""Where the time of one registration goes, by torch operator (``torch.profiler``).

Registers FreeSurfer's bert to fsaverage (1 mm brains, ``-m joint``, the default refinement)
once to warm up, then once under the profiler, and prints the stage times and the operators
that took the most time (self time, CPU and, on a GPU, CUDA). On an H200 the refinement of
this pair took 21.6 s (session 34), no less than on 2 CPU threads (15.3 s): the table says why.

Usage (from the repository root)::

    python benchmarks/profile_register.py --device cuda
    python benchmarks/profile_register.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as C


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--refine', type=int, default=15)
    parser.add_argument('--rows', type=int, default=25, help='operators listed (25)')
    args = parser.parse_args(argv)
    C.pin_threads(args.threads)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from synthmorph_app.engine.register import register
    from synthmorph_app.io.images import load_image

    torch.set_num_threads(args.threads)
    mri = C.DATA / 'freesurfer'
    moving = load_image(mri / 'bert' / 'mri' / 'brain.mgz')
    fixed = load_image(mri / 'fsaverage' / 'mri' / 'brain.mgz')
    kwargs = {'mode': 'joint', 'refine': args.refine, 'device': args.device}
    start = time.perf_counter()
    register(moving, fixed, **kwargs)
    print(f'warm-up run: {time.perf_counter() - start:.1f} s')
    activities = [ProfilerActivity.CPU]
    if args.device == 'cuda':
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        result = register(moving, fixed, **kwargs)
        if args.device == 'cuda':
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    stages = ', '.join(f'{k} {v:.2f}' for k, v in result.timings.items())
    print(f'profiled run: {wall:.1f} s ({stages})')
    keys = ['self_cpu_time_total'] + (['self_cuda_time_total'] if args.device == 'cuda' else [])
    for key in keys:
        print(f'\nby {key}:')
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
