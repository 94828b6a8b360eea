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
from pathlib import Path

import _common as C
from refine_bench import PAIRS, t1w

LAMBDAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def plot(rows: list[dict], path: Path) -> None:
    summary = C.summarise(rows, ['dice', 'sd_logj', 'fold_brain'], by='lambda')
    pairs = len(rows) // max(len(summary), 1)
    C.plot_dice_and_spread(summary, path, 'lambda (regularisation weight)', 'mean Dice (DLMUSE)',
                           f'register -r LAMBDA, {pairs} T1w pairs (2 mm)')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--pairs', type=int, default=2, help='how many pairs (default 2)')
    parser.add_argument('--lambdas', default=','.join(map(str, LAMBDAS)),
                        help='comma-separated lambdas (default 0.1,0.3,0.5,0.7,0.9)')
    parser.add_argument('--threads', type=int, default=1, help='threads per method (default 1)')
    parser.add_argument('-w', '--weights', action='append', metavar='FILE',
                        help='model files for register -w (default: the packaged ones)')
    C.add_register_options(parser, '--register-options', '--refine 0 --passes 2')
    parser.add_argument('--json', type=Path, default=Path('lambda_bench.json'),
                        help='where to write all figures (default lambda_bench.json)')
    parser.add_argument('--plot', type=Path, help='write the plot (PNG) here')
    args = parser.parse_args(argv)
    C.pin_threads(args.threads)
    lams = [float(v) for v in args.lambdas.split(',')]
    rows = []
    for mov, fix in PAIRS[: args.pairs]:
        moving, fixed = C.load(t1w(mov)), C.load(t1w(fix))
        mlab, flab = C.load(C.dlmuse_labels(mov))[0], C.load(C.dlmuse_labels(fix))[0]
        brain = flab > 0
        for lam in lams:
            options = (['-r', str(lam)] + [x for w in args.weights or [] for x in ('-w', w)]
                       + list(args.register_options))
            result = C.in_child(C.run_register, str(t1w(mov)), str(t1w(fix)), 'joint',
                                args.threads, options)
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
