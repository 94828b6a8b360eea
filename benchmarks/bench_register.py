"""Wall time and peak memory of a joint registration, split into stages.

Registers FreeSurfer's bert (1 mm, 256^3, head) to the 2 mm MNI152NLin6Asym head template, as
``synthmorph-app register -m joint`` does, and prints load / preprocess / networks / resample /
write times and the peak resident memory of the process.

Usage (from the repository root)::

    python benchmarks/bench_register.py --threads 2                 # our default models
    python benchmarks/bench_register.py --threads 2 --official      # official sizes, random
    python benchmarks/bench_register.py --device cuda               # on a GPU

Each configuration runs in a fresh process (``--repeat`` times) so peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get('SYNTHMORPH_SHARED_DATA', REPO.parent / 'shared' / 'data'))
MOVING = DATA / 'freesurfer' / 'bert' / 'mri' / 'norm.mgz'
FIXED = DATA / 'templateflow' / 'tpl-MNI152NLin6Asym' / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz'


def official_random_models() -> dict:
    """Models of the official SynthMorph sizes (FreeSurfer 8) with random weights.

    Detector: 4 levels of 256 filters, 4 more convolutions, 64 features, at 2 mm (12.8 M
    parameters); hyper U-Net: 256 filters everywhere, 4 levels, 4 dense layers of 32, at 1 mm
    (877 M parameters). Sizes as in ``synthmorph_app.engine.keras``.
    """
    import torch

    from synthmorph_app.engine.networks import build_model

    torch.manual_seed(0)
    affine = build_model({
        'arch': 'AffineDetector', 'in_channels': 1, 'enc': [256] * 4, 'dec': [],
        'add': [256] * 4, 'num_features': 64, 'downsample': 'subsample',
        'feature_activation': 'relu', 'rigid': False, 'rigid_method': 'decompose',
        'symmetrize': 'mean', 'ridge': 0.0})
    deform = build_model({
        'arch': 'HyperUNet', 'in_channels': 1, 'enc': [256] * 4, 'dec': [256] * 4,
        'add': [256] * 4, 'hyper_units': [32] * 4, 'hyper_activation': 'relu',
        'hyper_inputs': 1, 'downsample': 'subsample', 'final_init_std': 1e-5})
    card = {'name': 'official-size-random', 'trained': False}
    return {
        'affine': (affine, {**card, 'space': {'voxel_size': 2.0, 'divisor': 16}}),
        'deform': (deform, {**card, 'space': {'voxel_size': 1.0, 'divisor': 32}}),
    }


def run_once(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from synthmorph_app.engine.register import moved_image, register
    from synthmorph_app.io.images import load_image, save_image
    from synthmorph_app.io.transforms import save_transform

    weights = official_random_models() if args.official else None
    timings = {}
    start = time.perf_counter()
    moving = load_image(MOVING)
    fixed = load_image(FIXED)
    timings['load'] = time.perf_counter() - start
    result = register(moving, fixed, mode=args.mode, weights=weights, device=args.device,
                      extent=args.extent, refine=args.refine)
    timings.update(result.timings)
    start = time.perf_counter()
    moved = moved_image(moving, result.forward, device=args.device)
    timings['resample'] = timings.get('resample', 0) + time.perf_counter() - start
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        save_transform(result.forward, Path(tmp) / 'fwd.h5')
        save_image(moved, Path(tmp) / 'moved.nii.gz')
    timings['write'] = time.perf_counter() - start
    timings['total'] = sum(v for k, v in timings.items())
    timings['peak_rss_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    if args.device == 'cuda':
        timings['peak_cuda_gb'] = torch.cuda.max_memory_allocated() / 1024**3
    return timings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--official', action='store_true',
                        help='official SynthMorph model sizes with random weights')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--mode', default='joint', choices=('joint', 'affine', 'deform'))
    parser.add_argument('--extent', type=float, default=256.0,
                        help='network space side in mm (the official deform model at 1 mm '
                             'and 256 mm needs about 30 min on 2 CPU cores)')
    parser.add_argument('--refine', type=int, default=0,
                        help='test-time optimisation iterations (default 0: the networks '
                             'alone, what this benchmark times; the engine default is 15)')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_once(args)))
        return 0
    runs = []
    for _ in range(args.repeat):
        cmd = [sys.executable, __file__, '--child', '--threads', str(args.threads),
               '--device', args.device, '--mode', args.mode, '--extent', str(args.extent),
               '--refine', str(args.refine)]
        cmd += ['--official'] if args.official else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    keys = list(runs[0])
    print(f'{"stage":<14}' + ''.join(f'{"run " + str(i + 1):>10}' for i in range(len(runs)))
          + f'{"median":>10}')
    for key in keys:
        values = [r.get(key, 0.0) for r in runs]
        med = sorted(values)[len(values) // 2]
        print(f'{key:<14}' + ''.join(f'{v:10.2f}' for v in values) + f'{med:10.2f}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
