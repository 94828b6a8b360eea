"""Benchmark of the engine's test-time optimisation on cross-subject T1w pairs.

For each pair (moving ``sub-A`` T1w -> fixed ``sub-B`` T1w from ``../shared/data/bids``, 2 mm,
whole head with neck): ours (robust affine initialisation + affine optimisation + SVF
optimisation, ``synthmorph_app.engine.optimise``, tunable below), and on the same pair greedy
(``picsl_greedy``: affine then deformable, NCC), and with flags ANTs SyN (antspyx defaults),
FireANTs (greedy deformable on the CPU, after greedy's affine by default), ConvexAdam (MIND-SSC,
after antspyx ``Affine`` by default) and ``synthmorph-app register``'s defaults through the public API.
``--register-fixed-mask`` gives that run the fixed subject's DLMUSE labels as its brain mask
(``-x``): what a fixed image with a known brain mask, such as a template, gets.

Every method runs in its own child process (peak memory is its own) and is scored by one code
path (``benchmarks/_common.py``, ``synthmorph_app.evaluate``): Dice over the DLMUSE labels present
in both maps after the affine part and after the whole transform (moving labels resampled once,
nearest neighbour), MIND-NCC of the moved image in the fixed brain (DLMUSE labels > 0), % of
voxels with a Jacobian determinant <= 0 in the fixed brain and head, SD of the log Jacobian in
the brain, wall time (also as a ratio to greedy's on the same pair) and peak memory.

``--moving-contrast FLAIR`` moves ``sub-A``'s FLAIR (its own 2 mm grid) instead of its T1w:
cross-subject *and* cross-contrast pairs with labels. ``sub-A``'s DLMUSE labels (on its T1w grid)
are carried onto its FLAIR by antspyx ``Rigid`` (T1w -> FLAIR of the one person, mutual
information; the two scans of a session can differ by several mm and degrees, so the world
coordinates alone would not do), once per subject and the same for every method. greedy then
uses NMI unless ``--greedy-metric`` says otherwise. ``--same-subject`` pairs each moving subject
with its own T1w instead: with FLAIR, a check of what a deformable step does where a rigid map
suffices (as far as the two scans of a session share their geometry).

Run from the repository root, e.g.::

    python benchmarks/refine_bench.py --pairs 4 --ants --fireants --convexadam
    python benchmarks/refine_bench.py --pairs 12 --moving-contrast FLAIR --no-ours --register

This is a script, not a timed test. See ``benchmarks/README.md`` for figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import _common as C
import numpy as np

DATA = C.DATA / 'bids'

#: Cross-subject pairs (moving, fixed): disjoint subjects first, then a ring.
PAIRS = [
    ('01', '02'),
    ('03', '04'),
    ('05', '06'),
    ('07', '08'),
    ('09', '10'),
    ('11', '12'),
    ('02', '03'),
    ('04', '05'),
    ('06', '07'),
    ('08', '09'),
    ('10', '11'),
    ('12', '01'),
]

def anat(sub: str, contrast: str) -> Path:
    return DATA / f'sub-{sub}' / 'anat' / f'sub-{sub}_{contrast}.nii.gz'


def t1w(sub: str) -> Path:
    return anat(sub, 'T1w')


def moving_labels(sub: str, contrast: str, moving_grid) -> np.ndarray:
    """``sub``'s DLMUSE labels on ``moving_grid``, the Geometry of its ``contrast`` image; for
    another contrast than T1w, carried by antspyx ``Rigid`` (in a child)."""
    import nibabel as nb

    from synthmorph_app.io.images import Geometry

    img = nb.load(C.dlmuse_labels(sub))  # on the T1w grid
    lab = np.asarray(img.dataobj).astype(np.float32)
    if contrast == 'T1w':
        return lab
    t1_grid = Geometry.from_image(img)
    rigid = C.in_child(C.run_ants, str(t1w(sub)), str(anat(sub, contrast)), 'Rigid')
    xfm = C.as_transform(rigid, moving_grid, t1_grid, linear=True)
    return C.moved(lab, t1_grid, xfm, moving_grid, mode='nearest')


def run_ours(moving_path, fixed_path, args) -> dict:
    """The optimiser path (child process): brain weights, robust init, affine, SVF."""
    torch = C._torch_threads()
    from synthmorph_app.engine import masks, optimise, spatial
    from synthmorph_app.io.images import Geometry, load_image

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format='%(name)s: %(message)s'
    )
    mimg, fimg = load_image(moving_path), load_image(fixed_path)
    mgrid, fgrid = Geometry.from_image(mimg), Geometry.from_image(fimg)
    mov = spatial.volume_tensor(mimg.get_fdata(dtype=np.float32))
    fix = spatial.volume_tensor(fimg.get_fdata(dtype=np.float32))
    t0 = time.perf_counter()
    fw = masks.similarity_weight(fix, fgrid, args.weight)
    mw = masks.similarity_weight(mov, mgrid, args.weight)
    t_mask = time.perf_counter() - t0
    store = None
    if args.cache:  # tuning aid: reuse the affines of an earlier run
        key = f'{Path(moving_path).name}_{Path(fixed_path).name}_{args.weight}'
        store = Path(args.cache) / f'{key}.npy'
    if store is not None and store.exists():
        affine = np.load(store)
        t_init = t_aff = time.perf_counter() - t0
    else:
        init = optimise.robust_affine_init(
            mov, mgrid, fix, fgrid, fixed_weight=fw, moving_weight=mw, metric=args.metric,
            verbose=args.verbose,
        )
        t_init = time.perf_counter() - t0
        affine = optimise.optimise_affine(
            mov, mgrid, fix, fgrid, init, metric=args.metric, fixed_weight=fw,
            moving_weight=mw, verbose=args.verbose, levels=args.affine_levels,
            iterations=args.affine_iterations,
        )
        t_aff = time.perf_counter() - t0
        if store is not None:
            store.parent.mkdir(parents=True, exist_ok=True)
            np.save(store, affine)
    field = None
    if not args.affine_only:
        moved = spatial.resample_linear(mov, mgrid, fgrid, affine)
        velocity = optimise.optimise_svf(
            moved, fix, fgrid, lam=args.lam, metric=args.metric, levels=args.levels,
            iterations=args.iterations, weight=fw, verbose=args.verbose, lr=args.lr,
            symmetric=args.symmetric, roi_threshold=args.roi_threshold,
            velocity_factor=args.velocity_factor, exact_gradient=args.exact_gradient,
        )
        with torch.no_grad():
            disp = spatial.integrate_svf(velocity.detach())
            world = spatial.field_voxel_to_world(disp, fgrid.affine)
            field = world[0].permute(1, 2, 3, 0).numpy()
    t_all = time.perf_counter() - t0
    out = C._transform_dict(affine, field, fgrid if field is not None else None)
    out.update(time=t_all, affine_time=t_aff, stages={
        'mask': t_mask, 'init': t_init - t_mask, 'affine': t_aff - t_init, 'svf': t_all - t_aff,
    })
    return out


def _runners(args) -> dict:
    runners = {}
    if args.none:
        runners['none'] = C.run_none
    if not args.no_ours:
        runners['ours'] = lambda m, f: C.in_child(run_ours, str(m), str(f), args)
    if args.register:
        def run_register(m, f):
            # {t1w}: the moving subject's T1w (e.g. --register-options="--via {t1w}")
            own_t1w = str(t1w(Path(m).name.split('_')[0][len('sub-'):]))
            options = [o.replace('{t1w}', own_t1w) for o in args.register_options]
            if args.register_fixed_mask:  # the fixed subject's labels: non-zero is brain
                options += ['-x', str(C.dlmuse_labels(Path(f).name.split('_')[0][len('sub-'):]))]
            return C.in_child(C.run_register, str(m), str(f), args.register_mode,
                              args.threads, options)

        runners['register'] = run_register
    if not args.no_greedy:
        metric = args.greedy_metric or ('NCC 2x2x2' if args.moving_contrast == 'T1w' else 'NMI')
        runners['greedy'] = lambda m, f: C.in_child(C.run_greedy, str(m), str(f), metric,
                                                    args.threads)
    if args.ants:
        runners['ants'] = lambda m, f: C.in_child(C.run_ants, str(m), str(f), 'SyN',
                                                  args.threads)
    if args.fireants:
        runners['fireants'] = lambda m, f: C.in_child(C.run_fireants, str(m), str(f),
                                                      args.threads, args.fireants_affine)
    if args.convexadam:
        runners['convexadam'] = lambda m, f: C.in_child(
            C.run_convexadam, str(m), str(f), args.threads, args.convexadam_affine
        )
    return runners


COLUMNS = C.columns('pair', 'method', 'dice_aff', 'dice', 'mind_ncc', 'fold_brain', 'fold_head',
                    'sd_logj', 'time', 'time_ratio', 'peak_mb')
SUMMARY = C.columns('method', 'pairs', 'dice_aff', 'dice', 'worst_dice', 'mind_ncc', 'fold_brain',
                    'fold_head', 'sd_logj', 'time', 'time_ratio', 'peak_mb',
                    dice_aff='mean Dice after affine', dice='mean Dice')


def main(argv=None):
    # The optimiser's own defaults (torch is imported here, not at the top: children that
    # re-import this script for other methods stay light).
    from synthmorph_app.engine import optimise

    svf = optimise.optimise_svf.__kwdefaults__
    aff = optimise.optimise_affine.__kwdefaults__
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        epilog='Writes all figures to --json and prints Markdown tables.',
    )
    sel = parser.add_argument_group('pairs and methods')
    sel.add_argument('--pairs', type=int, default=4, help='number of pairs, from the first '
                     '(max 12; default 4)')
    sel.add_argument('--only', type=int, nargs='+', help='indices into the pair list instead')
    sel.add_argument('--no-ours', action='store_true', help='skip the optimiser path')
    sel.add_argument('--register', action='store_true',
                     help="also ours through the public API, as 'synthmorph-app register' "
                          'runs by default (joint, its default --refine or $SYNTHMORPH_REFINE)')
    sel.add_argument('--register-mode', choices=('joint', 'affine', 'rigid'), default='joint',
                     help="the mode of --register (default joint; with affine, the 'Dice' "
                          "column is the affine's)")
    C.add_register_options(sel, '--register-options',
                           '-w training/deform-cv/deform.pt --refine 0')
    sel.add_argument('--register-fixed-mask', action='store_true',
                     help="give --register the fixed subject's DLMUSE labels as its brain mask "
                          '(-x; non-zero is brain): a fixed image with a known brain mask, as '
                          'a template has')
    sel.add_argument('--no-greedy', action='store_true', help='skip greedy (no time ratios)')
    sel.add_argument('--none', action='store_true',
                     help='also a row without registration (the identity in world space)')
    sel.add_argument('--ants', action='store_true', help='also antspyx SyN (its defaults)')
    sel.add_argument('--fireants', action='store_true',
                     help='also FireANTs (greedy deformable after an affine, --fireants-affine)')
    sel.add_argument('--fireants-affine', choices=('greedy', 'ants', 'own'), default='greedy',
                     help="the affine FireANTs' deformable step starts from (default greedy; "
                          "own: FireANTs' moments + affine, which fails on these whole-head "
                          'pairs)')
    sel.add_argument('--convexadam', action='store_true',
                     help='also ConvexAdam (MIND-SSC) after an affine (--convexadam-affine)')
    sel.add_argument('--convexadam-affine', choices=('ants', 'greedy'), default='ants',
                     help='the affine ConvexAdam starts from (default ants: antspyx Affine)')
    sel.add_argument('--moving-contrast', choices=('T1w', 'FLAIR'), default='T1w',
                     help="the moving subject's image (the fixed one is always a T1w); FLAIR: "
                          'labels carried by a same-subject rigid registration (see above)')
    sel.add_argument('--same-subject', action='store_true',
                     help="each pair's moving subject to its own T1w (with --moving-contrast "
                          'FLAIR: the labels match after the rigid alignment, so as far as '
                          "the two scans share their geometry, a deformable step's motion is "
                          'error)')
    sel.add_argument('--greedy-metric', help="greedy's metric (default: NCC 2x2x2 for T1w, NMI "
                                             'for FLAIR)')
    sel.add_argument('--threads', type=int, default=1, help='threads of every method (1)')
    sel.add_argument('--json', default=str(C.REPO / 'benchmarks' / 'results' /
                                            'refine_bench.json'), help='output JSON')
    sel.add_argument('--from-json', nargs='+', metavar='JSON',
                     help='run nothing: print the tables of the rows in these JSON files '
                          '(e.g. two runs over different pairs)')
    opt = parser.add_argument_group("the optimiser path's settings ('ours')")
    opt.add_argument('--weight', default='brain', choices=('brain', 'head', 'none'))
    opt.add_argument('--metric', default='auto', choices=('auto', 'lncc', 'mind'))
    opt.add_argument('--lam', type=float, default=0.5)
    opt.add_argument('--lr', type=float, default=svf['lr'])
    opt.add_argument('--levels', type=float, nargs='+', default=svf['levels'])
    opt.add_argument('--iterations', type=int, nargs='+', default=svf['iterations'])
    opt.add_argument('--affine-levels', type=float, nargs='+', default=aff['levels'])
    opt.add_argument('--affine-iterations', type=int, nargs='+',
                     default=aff['iterations'])
    opt.add_argument('--symmetric', action='store_true')
    opt.add_argument('--exact-gradient', action='store_true')
    opt.add_argument('--roi-threshold', type=float, default=svf['roi_threshold'])
    opt.add_argument('--velocity-factor', type=float, default=svf['velocity_factor'])
    opt.add_argument('--affine-only', action='store_true')
    opt.add_argument('--cache', help='folder to keep our affines and the other methods\' rows '
                     '(a tuning aid)')
    opt.add_argument('-v', '--verbose', action='store_true')
    args = parser.parse_args(argv)
    if args.from_json:
        rows = [r for f in args.from_json for r in json.loads(Path(f).read_text())['rows']]
        report(rows)
        return 0
    C.pin_threads(args.threads)
    import nibabel as nb

    from synthmorph_app.engine import masks

    runners = _runners(args)
    print(f'moving {args.moving_contrast}; threads {args.threads}; methods {", ".join(runners)}; '
          f'ours: lam {args.lam}, levels '
          f'{args.levels}, iterations {args.iterations}, weight {args.weight}, metric '
          f'{args.metric}', flush=True)
    selected = [PAIRS[i] for i in args.only] if args.only else PAIRS[: args.pairs]
    if args.same_subject:
        selected = [(mov, mov) for mov, _ in selected]
    rows = []
    contrast = args.moving_contrast
    tag = '' if contrast == 'T1w' else f'_{contrast}'
    for mov, fix in selected:
        pair = f'{mov}->{fix}' if contrast == 'T1w' else f'{mov} {contrast}->{fix}'
        moving_path = anat(mov, contrast)
        flab = np.asarray(nb.load(C.dlmuse_labels(fix)).dataobj).astype(np.int32)
        fixed, moving = C.load(t1w(fix)), C.load(moving_path)
        mlab = moving_labels(mov, contrast, moving[1])
        brain = flab > 0
        head = masks.head_mask(fixed[0], fixed[1], top_mm=None)
        common = np.intersect1d(np.unique(flab[flab > 0]), np.unique(mlab[mlab > 0]))
        pair_rows = []
        for name, runner in runners.items():
            store = Path(args.cache or '/nonexistent') / f'{name}_{mov}_{fix}{tag}.json'
            if name != 'ours' and store.exists():
                row = json.loads(store.read_text())
                row['cached'] = True
            else:
                res = runner(moving_path, t1w(fix))
                row = C.result_row(pair, name, res, affine_time=res.get('affine_time'))
                kw = {'moving_labels': mlab, 'fixed_labels': flab, 'labels': common}
                row['dice_aff'] = C.score(res, moving, fixed, linear=True, **kw)['dice']
                row.update(C.score(res, moving, fixed, mind_mask=brain, sd_mask='brain',
                                   jac_masks={'brain': brain, 'head': head}, **kw))
                if name != 'ours' and args.cache:
                    store.parent.mkdir(parents=True, exist_ok=True)
                    store.write_text(json.dumps(row, default=C._json_default))
            pair_rows.append(row)
            C.print_row(row, ('dice_aff', 'dice', 'mind_ncc', 'fold_brain', 'fold_head',
                              'sd_logj'), width=10)
        C.add_time_ratios(pair_rows, greedy='greedy')
        rows.extend(pair_rows)
        summary = C.summarise(rows, [k for k, _, _ in SUMMARY[2:] if k != 'worst_dice'])
        C.write_results(args.json, 'refine_bench', argv, rows, summary=summary)
    report(rows)
    return 0


def report(rows: list[dict]) -> None:
    """Print the per-pair and summary tables, and ours minus greedy."""
    summary = C.summarise(rows, [k for k, _, _ in SUMMARY[2:] if k != 'worst_dice'])
    print()
    print(C.markdown(rows, COLUMNS))
    print()
    print(C.markdown(summary, SUMMARY))
    ours = {r['pair']: r['dice'] for r in rows if r['method'] == 'ours'}
    theirs = {r['pair']: r['dice'] for r in rows if r['method'] == 'greedy'}
    diffs = [ours[p] - theirs[p] for p in ours if p in theirs]
    if diffs:
        print(f'\nours - greedy Dice: mean {np.mean(diffs):+.3f}, worst {min(diffs):+.3f}')


if __name__ == '__main__':
    sys.exit(main())
