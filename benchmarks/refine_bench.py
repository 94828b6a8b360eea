"""Benchmark of the engine's test-time optimisation on cross-subject T1w pairs.

For each pair (moving ``sub-A`` T1w -> fixed ``sub-B`` T1w from ``../shared/data/bids``):
robust affine initialisation + affine optimisation + symmetric SVF optimisation
(``synthmorph_app.engine.optimise``), and, when ``picsl_greedy`` is installed, greedy (affine
then deformable) on the same pair, side by side. Reported per pair and as a mean: Dice over the
DLMUSE labels (moving labels pulled onto the fixed grid with nearest-neighbour interpolation,
after the affine and after the deformable step), % of brain and of head voxels where the
Jacobian determinant is <= 0, the SD of its log over the brain, and wall time.

Run from the repository root, e.g.::

    python benchmarks/refine_bench.py --pairs 4 --threads 1

This is a script, not a timed test. See ``benchmarks/README.md`` for figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import torch

from synthmorph_app.engine import masks, optimise, spatial
from synthmorph_app.io.images import Geometry, load_image
from synthmorph_app.io.transforms import Transform

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get('SYNTHMORPH_SHARED_DATA', REPO.parent / 'shared' / 'data')) / 'bids'

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


def t1w(sub: str) -> Path:
    return DATA / f'sub-{sub}' / 'anat' / f'sub-{sub}_T1w.nii.gz'


def labels(sub: str) -> Path:
    return (
        DATA
        / 'derivatives'
        / 'dlmuse'
        / f'sub-{sub}'
        / 'anat'
        / f'sub-{sub}_space-T1w_desc-dlmuse_dseg.nii.gz'
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the labels (> 0) present in both maps."""
    common = np.intersect1d(np.unique(a[a > 0]), np.unique(b[b > 0]))
    scores = [2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k)) for k in common]
    return float(np.mean(scores))


def jacobian_det(disp: np.ndarray, to_world: np.ndarray) -> np.ndarray:
    """det(I + du/dx) of a displacement (X, Y, Z, 3) in mm whose voxel->mm matrix is to_world."""
    grads = np.stack([np.stack(np.gradient(disp[..., c]), -1) for c in range(3)], -2)
    jac = grads @ np.linalg.inv(to_world)  # du/dijk @ dijk/dx
    return np.linalg.det(jac + np.eye(3))


def field_stats(det: np.ndarray, brain: np.ndarray, head: np.ndarray) -> dict:
    return {
        'fold_brain': 100.0 * float(np.mean(det[brain] <= 0)),
        'fold_head': 100.0 * float(np.mean(det[head] <= 0)),
        'sd_logj': float(np.std(np.log(np.clip(det[brain], 1e-3, None)))),
    }


def run_ours(moving_path, fixed_path, mlab, args):
    mimg, fimg = load_image(moving_path), load_image(fixed_path)
    mgrid, fgrid = Geometry.from_image(mimg), Geometry.from_image(fimg)
    mov = spatial.volume_tensor(mimg.get_fdata(dtype=np.float32))
    fix = spatial.volume_tensor(fimg.get_fdata(dtype=np.float32))
    t0 = time.perf_counter()
    fw = masks.similarity_weight(fix, fgrid, args.weight)
    mw = masks.similarity_weight(mov, mgrid, args.weight)
    t_mask = time.perf_counter() - t0
    store = None
    if args.cache:  # tuning aid: reuse the affines (and greedy's figures) of an earlier run
        key = f'{Path(moving_path).name}_{Path(fixed_path).name}_{args.weight}'
        store = Path(args.cache) / f'{key}.npy'
    if store is not None and store.exists():
        affine = np.load(store)
        t_init = t_aff = time.perf_counter() - t0
    else:
        init = optimise.robust_affine_init(
            mov,
            mgrid,
            fix,
            fgrid,
            fixed_weight=fw,
            moving_weight=mw,
            metric=args.metric,
            verbose=args.verbose,
        )
        t_init = time.perf_counter() - t0
        affine = optimise.optimise_affine(
            mov,
            mgrid,
            fix,
            fgrid,
            init,
            metric=args.metric,
            fixed_weight=fw,
            moving_weight=mw,
            verbose=args.verbose,
            levels=args.affine_levels,
            iterations=args.affine_iterations,
        )
        t_aff = time.perf_counter() - t0
        if store is not None:
            store.parent.mkdir(parents=True, exist_ok=True)
            np.save(store, affine)
    moved = spatial.resample_linear(mov, mgrid, fgrid, affine)
    velocity = None
    if not args.affine_only:
        velocity = optimise.optimise_svf(
            moved,
            fix,
            fgrid,
            lam=args.lam,
            metric=args.metric,
            levels=args.levels,
            iterations=args.iterations,
            weight=fw,
            verbose=args.verbose,
            lr=args.lr,
            symmetric=args.symmetric,
            roi_threshold=args.roi_threshold,
            velocity_factor=args.velocity_factor,
            exact_gradient=args.exact_gradient,
        )
    t_all = time.perf_counter() - t0
    lab = spatial.volume_tensor(mlab)
    aff_lab = spatial.resample_linear(lab, mgrid, fgrid, affine, mode='nearest')[0, 0].numpy()
    out = {
        'time': t_all,
        't_mask': t_mask,
        't_init': t_init - t_mask,
        't_affine': t_aff - t_init,
        't_svf': t_all - t_aff,
        'aff_lab': aff_lab,
    }
    if velocity is not None:
        disp = spatial.integrate_svf(velocity)
        world = spatial.field_voxel_to_world(disp, fgrid.affine)[0].permute(1, 2, 3, 0).numpy()
        # one resampling of the labels through the affine and the field together
        xfm = Transform(affine, world, fgrid, reference=fgrid, moving=mgrid)
        out['lab'] = spatial.apply_transform(lab, mgrid, xfm, fgrid, mode='nearest')[0, 0].numpy()
        out['det'] = jacobian_det(world, fgrid.affine[:3, :3])
    else:
        out['lab'] = aff_lab
    return out


@contextlib.contextmanager
def _quiet():
    """Silence greedy, whose C++ code prints to the process's stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, 'w') as null:
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def run_greedy(moving_path, fixed_path, mlab_path, threads):
    from picsl_greedy import Greedy3D

    sink = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        aff, warp = f'{tmp}/aff.mat', f'{tmp}/warp.nii.gz'
        out_aff, out_lab = f'{tmp}/aff_lab.nii.gz', f'{tmp}/lab.nii.gz'
        t0 = time.perf_counter()
        g = Greedy3D()
        g.execute(
            f'-threads {threads} -d 3 -a -dof 12 -i {fixed_path} {moving_path} -o {aff} '
            '-ia-image-centers -n 100x50x10 -m NCC 2x2x2',
            out=sink,
            err=sink,
        )
        t_aff = time.perf_counter() - t0
        g.execute(
            f'-threads {threads} -d 3 -i {fixed_path} {moving_path} -it {aff} -o {warp} '
            '-n 100x50x10 -m NCC 2x2x2',
            out=sink,
            err=sink,
        )
        t_all = time.perf_counter() - t0
        g.execute(
            f'-threads {threads} -d 3 -rf {fixed_path} -ri NN -rm {mlab_path} {out_aff} -r {aff}',
            out=sink,
            err=sink,
        )
        g.execute(
            f'-threads {threads} -d 3 -rf {fixed_path} -ri NN -rm {mlab_path} {out_lab} '
            f'-r {warp} {aff}',
            out=sink,
            err=sink,
        )
        aff_lab = np.asarray(nb.load(out_aff).dataobj)
        lab = np.asarray(nb.load(out_lab).dataobj)
        wimg = nb.load(warp)
        field = np.asarray(wimg.dataobj, dtype=np.float64).reshape(*lab.shape, 3)
        # greedy's warp is an ITK field: LPS millimetres; use LPS coordinates for the Jacobian.
        lps = np.diag([-1.0, -1.0, 1.0])
        det = jacobian_det(field, lps @ wimg.affine[:3, :3])
    return {'time': t_all, 't_affine': t_aff, 'aff_lab': aff_lab, 'lab': lab, 'det': det}


def run_ants(moving_path, fixed_path, mlab_path, threads):
    """antspyx SyN (its defaults: rigid, affine, then SyN), side by side with greedy."""
    os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'] = str(threads)
    import ants

    ants.config.set_ants_deterministic(True, 42)
    fixed, moving = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
    mlab = ants.image_read(str(mlab_path))
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        t0 = time.perf_counter()
        reg = ants.registration(fixed, moving, 'SyN', outprefix=f'{tmp}/syn_')
        t_all = time.perf_counter() - t0
        warp, affine = reg['fwdtransforms']
        aff_lab = ants.apply_transforms(fixed, mlab, [affine], interpolator='nearestNeighbor')
        lab = ants.apply_transforms(fixed, mlab, [warp, affine], interpolator='nearestNeighbor')
        wimg = nb.load(warp)
        field = np.asarray(wimg.dataobj, dtype=np.float64).reshape(*fixed.shape, 3)
        lps = np.diag([-1.0, -1.0, 1.0])
        det = jacobian_det(field, lps @ wimg.affine[:3, :3])
    return {'time': t_all, 'aff_lab': aff_lab.numpy(), 'lab': lab.numpy(), 'det': det}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--pairs', type=int, default=4, help='number of pairs (max 12)')
    parser.add_argument('--only', type=int, nargs='+', help='indices into PAIRS instead')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--no-greedy', action='store_true')
    parser.add_argument('--ants', action='store_true', help='also antspyx SyN (defaults)')
    parser.add_argument('--weight', default='brain', choices=('brain', 'head', 'none'))
    parser.add_argument('--metric', default='auto', choices=('auto', 'lncc', 'mind'))
    parser.add_argument('--lam', type=float, default=0.5)
    parser.add_argument('--lr', type=float, default=optimise.optimise_svf.__kwdefaults__['lr'])
    parser.add_argument(
        '--levels', type=float, nargs='+', default=optimise.optimise_svf.__kwdefaults__['levels']
    )
    parser.add_argument(
        '--iterations',
        type=int,
        nargs='+',
        default=optimise.optimise_svf.__kwdefaults__['iterations'],
    )
    parser.add_argument(
        '--affine-levels',
        type=float,
        nargs='+',
        default=optimise.optimise_affine.__kwdefaults__['levels'],
    )
    parser.add_argument(
        '--affine-iterations',
        type=int,
        nargs='+',
        default=optimise.optimise_affine.__kwdefaults__['iterations'],
    )
    parser.add_argument('--symmetric', action='store_true')
    parser.add_argument('--exact-gradient', action='store_true')
    parser.add_argument(
        '--roi-threshold',
        type=float,
        default=optimise.optimise_svf.__kwdefaults__['roi_threshold'],
    )
    parser.add_argument(
        '--velocity-factor',
        type=float,
        default=optimise.optimise_svf.__kwdefaults__['velocity_factor'],
    )
    parser.add_argument('--affine-only', action='store_true')
    parser.add_argument('--cache', help='folder to keep affines and greedy results (tuning)')
    parser.add_argument('-v', '--verbose', action='store_true')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format='%(name)s: %(message)s'
    )
    try:
        import picsl_greedy  # noqa: F401

        greedy = not args.no_greedy
    except ImportError:
        greedy = False

    rows = []
    print(
        f'threads {args.threads}; lam {args.lam}; levels {args.levels}; iterations '
        f'{args.iterations}; weight {args.weight}; metric {args.metric}',
        flush=True,
    )
    header = (
        f'{"pair":8} {"method":7} {"Dice aff":>8} {"Dice":>6} {"fold% br":>8} '
        f'{"fold% hd":>8} {"SD logJ":>7} {"time s":>7}'
    )
    print(header, flush=True)
    selected = [PAIRS[i] for i in args.only] if args.only else PAIRS[: args.pairs]
    for mov, fix in selected:
        flab_img = nb.load(labels(fix))
        flab = np.asarray(flab_img.dataobj).astype(np.int32)
        mlab = np.asarray(nb.load(labels(mov)).dataobj).astype(np.float32)
        fimg = load_image(t1w(fix))
        brain = flab > 0
        head = masks.head_mask(
            fimg.get_fdata(dtype=np.float32), Geometry.from_image(fimg), top_mm=None
        )
        results = {'ours': run_ours(t1w(mov), t1w(fix), mlab, args)}
        others = {'greedy': run_greedy} if greedy else {}
        if args.ants:
            others['ants'] = run_ants
        for name, runner in others.items():
            store = Path(args.cache or '/nonexistent') / f'{name}_{mov}_{fix}.json'
            if store.exists():
                results[name] = {'cached_row': json.loads(store.read_text())}
            else:
                results[name] = runner(t1w(mov), t1w(fix), labels(mov), args.threads)
        for name, res in results.items():
            if 'cached_row' in res:
                row = res['cached_row']
                rows.append(row)
                print(
                    f'{row["pair"]:8} {name:7} {row["dice_aff"]:8.3f} {row["dice"]:6.3f} '
                    f'{row["fold_brain"]:8.3f} {row["fold_head"]:8.3f} {row["sd_logj"]:7.3f} '
                    f'{row["time"]:7.1f}  (cached)',
                    flush=True,
                )
                continue
            row = {
                'pair': f'{mov}->{fix}',
                'method': name,
                'time': res['time'],
                'dice_aff': dice(res['aff_lab'], flab),
                'dice': dice(res['lab'], flab),
            }
            if 'det' in res:
                row.update(field_stats(res['det'], brain, head))
            else:
                row.update(fold_brain=np.nan, fold_head=np.nan, sd_logj=np.nan)
            rows.append(row)
            if name != 'ours' and args.cache:
                Path(args.cache).mkdir(parents=True, exist_ok=True)
                (Path(args.cache) / f'{name}_{mov}_{fix}.json').write_text(json.dumps(row))
            extra = ''
            if name == 'ours':
                extra = (
                    '  (mask {t_mask:.1f} init {t_init:.1f} affine {t_affine:.1f} svf {t_svf:.1f})'
                ).format(**res)
            print(
                f'{row["pair"]:8} {name:7} {row["dice_aff"]:8.3f} {row["dice"]:6.3f} '
                f'{row["fold_brain"]:8.3f} {row["fold_head"]:8.3f} {row["sd_logj"]:7.3f} '
                f'{row["time"]:7.1f}{extra}',
                flush=True,
            )
    print()
    for name in dict.fromkeys(r['method'] for r in rows):
        sel = [r for r in rows if r['method'] == name]
        mean = {
            k: np.mean([r[k] for r in sel])
            for k in ('dice_aff', 'dice', 'fold_brain', 'fold_head', 'sd_logj', 'time')
        }
        worst = min(r['dice'] for r in sel)
        print(
            f'{"mean":8} {name:7} {mean["dice_aff"]:8.3f} {mean["dice"]:6.3f} '
            f'{mean["fold_brain"]:8.3f} {mean["fold_head"]:8.3f} {mean["sd_logj"]:7.3f} '
            f'{mean["time"]:7.1f}   worst pair Dice {worst:.3f}'
        )
    if greedy:
        ours = {r['pair']: r['dice'] for r in rows if r['method'] == 'ours'}
        theirs = {r['pair']: r['dice'] for r in rows if r['method'] == 'greedy'}
        diffs = [ours[p] - theirs[p] for p in ours]
        print(f'ours - greedy Dice: mean {np.mean(diffs):+.3f}, worst {min(diffs):+.3f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
