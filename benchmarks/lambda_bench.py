"""Lambda sweep: one registration setting, several regularisation weights.

SynthMorph's hypernetwork lets the user pick the regularisation weight lambda at registration
time; our test-time refinement takes the same lambda (0 sharpest, 1 smoothest). This script
registers cross-subject T1w pairs of ``../shared/data/bids`` (2 mm, whole head) with
``synthmorph-app register``'s defaults at each lambda and reports mean Dice over the DLMUSE
labels, the SD of the log Jacobian determinant and % folding in the fixed brain, and writes a
plot (``--plot``): the spread must fall as lambda grows while Dice degrades gracefully.

Run from the repository root, e.g.::

    python benchmarks/lambda_bench.py --pairs 2 --plot benchmarks/figures/lambda.png

Each registration runs in its own child process (``_common.in_child``) and is scored by
``synthmorph_app.evaluate`` through ``_common.score``. A script, not a timed test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common as C
from refine_bench import PAIRS, labels, t1w

LAMBDAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def run_lambda(moving: str, fixed: str, lam: float, threads: int, weights=None) -> dict:
    """``synthmorph-app register -r LAM`` with every other option at its default (child)."""
    torch = C._torch_threads()
    from synthmorph_app.cli.parser import INIT_METHODS, build_parser
    from synthmorph_app.cli.run import assign_weights
    from synthmorph_app.engine.register import register
    from synthmorph_app.io.images import load_image

    argv = ['register', '-r', str(lam), '-j', str(threads)]
    for w in weights or []:
        argv += ['-w', w]
    args = build_parser().parse_args([*argv, moving, fixed])
    torch.set_num_threads(args.threads)
    mimg = load_image(args.moving, kind='moving image')
    fimg = load_image(args.fixed, kind='fixed image')
    t0 = time.perf_counter()
    result = register(
        mimg, fimg, mode=args.mode, lam=args.lam, steps=args.steps, extent=args.extent,
        weights=assign_weights(args.weights, args.mode), refine=args.refine, device='cpu',
        init_method=args.init if args.init in INIT_METHODS else 'network',
        refine_metric=args.refine_metric, refine_levels=args.refine_levels,
        refine_weight=args.refine_weight,
    )
    fwd = result.forward
    out = C._transform_dict(fwd.affine, fwd.field, fwd.field_geometry)
    out.update(time=time.perf_counter() - t0, refine=args.refine)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    summary = C.summarise(rows, ['dice', 'sd_logj', 'fold_brain'], by='lambda')
    lams = [r['lambda'] for r in summary]
    fig, left = plt.subplots(figsize=(5, 3.2), dpi=120)
    left.plot(lams, [r['dice'] for r in summary], 'o-', color='tab:blue')
    left.set_xlabel('lambda (regularisation weight)')
    left.set_ylabel('mean Dice (DLMUSE)', color='tab:blue')
    right = left.twinx()
    right.plot(lams, [r['sd_logj'] for r in summary], 's--', color='tab:red')
    right.set_ylabel('SD of log Jacobian (brain)', color='tab:red')
    left.set_title(f'register -r LAMBDA, {len(rows) // max(len(lams), 1)} T1w pairs (2 mm)')
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--pairs', type=int, default=2, help='how many pairs (default 2)')
    parser.add_argument('--lambdas', default=','.join(map(str, LAMBDAS)),
                        help='comma-separated lambdas (default 0.1,0.3,0.5,0.7,0.9)')
    parser.add_argument('--threads', type=int, default=1, help='threads per method (default 1)')
    parser.add_argument('-w', '--weights', action='append', metavar='FILE',
                        help='model files for register -w (default: the packaged ones)')
    parser.add_argument('--json', type=Path, default=Path('lambda_bench.json'),
                        help='where to write all figures (default lambda_bench.json)')
    parser.add_argument('--plot', type=Path, help='write the plot (PNG) here')
    args = parser.parse_args(argv)
    C.pin_threads(args.threads)
    lams = [float(v) for v in args.lambdas.split(',')]
    rows = []
    for mov, fix in PAIRS[: args.pairs]:
        moving, fixed = C.load(t1w(mov)), C.load(t1w(fix))
        mlab, flab = C.load(labels(mov))[0], C.load(labels(fix))[0]
        brain = flab > 0
        for lam in lams:
            result = C.in_child(run_lambda, str(t1w(mov)), str(t1w(fix)), lam, args.threads,
                                args.weights)
            row = {'pair': f'{mov}->{fix}', 'lambda': lam, 'time': result['time'],
                   'peak_mb': result['peak_mb']}
            row.update(C.score(result, moving, fixed, moving_labels=mlab, fixed_labels=flab,
                               jac_masks={'brain': brain}, sd_mask='brain'))
            rows.append(row)
            print(C.markdown([row], COLUMNS).splitlines()[-1], flush=True)
    print()
    print(C.markdown(C.summarise(rows, ['dice', 'sd_logj', 'fold_brain', 'time'], by='lambda'),
                     [('lambda', 'lambda', 1), ('pairs', 'pairs', 0), ('dice', 'mean Dice', 3),
                      ('worst_dice', 'worst pair', 3), ('sd_logj', 'SD log J', 3),
                      ('fold_brain', 'folding % brain', 4), ('time', 's per pair', 1)]))
    C.write_json(args.json, {'rows': rows, 'environment': C.environment(),
                             'command': 'python benchmarks/lambda_bench.py ' + ' '.join(
                                 argv if argv is not None else sys.argv[1:])})
    if args.plot:
        plot(rows, args.plot)
    return 0


COLUMNS = [('pair', 'pair', 0), ('lambda', 'lambda', 1), ('dice', 'Dice', 3),
           ('sd_logj', 'SD log J', 3), ('fold_brain', 'folding % brain', 4), ('time', 's', 1)]

if __name__ == '__main__':
    raise SystemExit(main())
