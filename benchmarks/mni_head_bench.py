"""The BIDS-App's default job on real scans: a whole-head T1w onto the whole-head
MNI152NLin6Asym T1w (``res-02``), scored with labels.

Moving: ``bids/sub-XX_T1w`` (2 mm, with neck). Fixed: ``tpl-MNI152NLin6Asym_res-02_T1w`` (with
head), the BIDS-App's default output space. Score: mean Dice over 21 subcortical structures
(ventricles, caudate, putamen, pallidum, thalamus, hippocampus, amygdala, accumbens, ventral DC,
brainstem): the subject's DLMUSE labels, renumbered to FreeSurfer's numbers (:data:`MUSE_TO_FS`;
odd MUSE numbers are right, even left), moved onto the template's ``res-01_desc-wmparc_dseg``
grid (nearest neighbour) and compared with it. Dice after the affine part and after the whole
transform.

``--contrast FLAIR`` moves each subject's FLAIR instead (its own grid), with its DLMUSE labels
carried onto it by antspyx ``Rigid`` from its T1w, as ``refine_bench.py --moving-contrast
FLAIR`` does. The BIDS-App registers a FLAIR with ``--cross-contrast yes``, so give ours that
option (``app="--cross-contrast yes"``); greedy then uses NMI, and ANTs SyN keeps its mutual
information. ``--template-contrast T2w`` registers to the template's T2w (with head, the same
grid) instead; greedy uses NMI wherever the two contrasts differ. ``--template-brain`` takes the
template's skull-stripped 1 mm image (``res-01_desc-brain``) instead, as a user with
skull-stripped scans (``strip_data.py``) would give the other tools.

``--settings NAME=OPTIONS`` runs ``register`` (``--mode``, joint by default) once per setting, each in its own
process, with OPTIONS passed to it (``auto=`` for the defaults; ``{t1w}`` in OPTIONS stands for
the subject's T1w, e.g. ``via="--via {t1w}"`` registers a FLAIR through it). Two names run other tools
instead: ``greedy`` (``picsl_greedy``: affine from the image centres, then deformable, NCC 2x2x2,
as ``refine_bench.py`` runs it), ``greedy-moments`` (the same from the centres of mass,
``-moments 1``, then rigid, then affine) and ``ants`` (antspyx ``SyN``, its defaults).

Run from the repository root::

    python benchmarks/mni_head_bench.py --settings auto= lncc="--refine-metric lncc" \\
        mind="--refine-metric mind"
    python benchmarks/mni_head_bench.py --contrast FLAIR \\
        --settings app="--cross-contrast yes" greedy ants

Writes every figure to ``--json`` and prints a Markdown table. A script, not a timed test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import refine_bench

#: DLMUSE (MUSE) label -> FreeSurfer aseg label, for the structures both have.
MUSE_TO_FS = {4: 14, 11: 15, 23: 58, 30: 26, 31: 54, 32: 18, 35: 16, 36: 50, 37: 11, 47: 53,
              48: 17, 51: 43, 52: 4, 55: 52, 56: 13, 57: 51, 58: 12, 59: 49, 60: 10, 61: 60,
              62: 28}
MNI = C.DATA / 'templateflow' / 'tpl-MNI152NLin6Asym'


def _setting(text: str) -> tuple[str, list[str]]:
    name, _, options = text.partition('=')
    if not name:
        raise argparse.ArgumentTypeError(f'NAME=OPTIONS, got {text!r}')
    return name, options.split()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--subjects', nargs='+',
                        default=[f'{i:02d}' for i in range(1, 13)], help='01 ... 12 (all)')
    parser.add_argument('--settings', nargs='+', type=_setting, default=[('auto', [])],
                        metavar='NAME=OPTIONS', help='register settings (default: auto=)')
    parser.add_argument('--mode', default='joint', choices=('joint', 'affine'),
                        help="ours' register mode (joint); greedy and ANTs stop after their "
                             'affine stage with affine')
    parser.add_argument('--contrast', default='T1w', choices=('T1w', 'FLAIR'),
                        help="the moving image: each subject's T1w (default) or FLAIR")
    parser.add_argument('--template-contrast', default='T1w', choices=('T1w', 'T2w'),
                        help="the fixed image: the template's T1w (default) or T2w, both "
                             'res-02 with head, one grid')
    parser.add_argument('--template-brain', action='store_true',
                        help="the fixed image: the template's skull-stripped res-01 "
                             '(desc-brain) image of --template-contrast instead of the res-02 '
                             'head, for skull-stripped inputs (strip_data.py)')
    parser.add_argument('--threads', type=int, default=1, help='threads (1)')
    parser.add_argument('--json', default=str(C.REPO / 'benchmarks' / 'results' /
                                              'mni_head_bench.json'), help='output JSON')
    args = parser.parse_args(argv)
    C.pin_threads(args.threads)
    import nibabel as nb

    from synthmorph_app import evaluate
    from synthmorph_app.io.images import Geometry

    fixed = str(MNI / (f'tpl-MNI152NLin6Asym_res-01_desc-brain_{args.template_contrast}.nii.gz'
                       if args.template_brain else
                       f'tpl-MNI152NLin6Asym_res-02_{args.template_contrast}.nii.gz'))
    wmparc = nb.load(str(MNI / 'tpl-MNI152NLin6Asym_res-01_desc-wmparc_dseg.nii.gz'))
    fixed_labels = np.rint(np.asarray(wmparc.dataobj)).astype(np.int32)
    label_grid = Geometry.from_image(wmparc)
    fixed_grid = Geometry.from_image(nb.load(fixed))
    labels = sorted(MUSE_TO_FS.values())
    affine_only = args.mode == 'affine'
    rows = []
    for sub in args.subjects:
        moving = str(refine_bench.anat(sub, args.contrast))
        moving_grid = Geometry.from_image(nb.load(moving))
        # DLMUSE on the moving image's grid (carried by a rigid map for a FLAIR)
        muse = np.rint(refine_bench.moving_labels(sub, args.contrast, moving_grid))
        # a T1w's labels stay on their own grid (a mirror may crop the image: fov_data.py)
        labels_grid = (Geometry.from_image(nb.load(C.dlmuse_labels(sub)))
                       if args.contrast == 'T1w' else moving_grid)
        moving_labels = np.zeros(muse.shape, np.float32)
        for a, b in MUSE_TO_FS.items():
            moving_labels[muse == a] = b
        for name, options in args.settings:
            if name in ('greedy', 'greedy-moments'):
                metric = 'NCC 2x2x2' if args.contrast == args.template_contrast else 'NMI'
                init = 'moments' if name == 'greedy-moments' else 'image-centers'
                res = C.in_child(C.run_greedy, moving, fixed, metric, args.threads,
                                 deformable=not affine_only, init=init)
            elif name == 'ants':
                res = C.in_child(C.run_ants, moving, fixed, 'Affine' if affine_only else 'SyN',
                                 args.threads)
            else:
                t1w = str(refine_bench.anat(sub, 'T1w'))
                res = C.in_child(C.run_register, moving, fixed, args.mode, args.threads,
                                 [o.replace('{t1w}', t1w) for o in options])
            row = {'subject': sub, 'contrast': args.contrast, 'setting': name,
                   'template_contrast': args.template_contrast,
                   'template_brain': args.template_brain,
                   'mode': args.mode, 'options': options,
                   'time': res['time'],
                   'peak_mb': res['peak_mb'],
                   'deformable': res.get('info', {}).get('refine', {}).get('deformable')}
            for key, linear in (('dice_aff', True), ('dice', False)):
                xfm = C.as_transform(res, fixed_grid, labels_grid, linear=linear)
                moved = C.moved(moving_labels, labels_grid, xfm, label_grid, mode='nearest')
                row[key] = evaluate.mean_dice(evaluate.dice_per_label(moved, fixed_labels,
                                                                      labels))
            rows.append(row)
            metric = (row['deformable'] or {}).get('metric')
            print(f"sub-{sub} {name}: Dice affine {row['dice_aff']:.3f}, joint "
                  f"{row['dice']:.3f} ({metric}, {row['time']:.0f} s)", flush=True)
            C.write_results(args.json, 'mni_head_bench', argv, rows)
    summary = C.summarise(rows, ['dice_aff', 'dice'], by='setting')
    for row in summary:
        row['picked'] = ', '.join(sorted({(r['deformable'] or {}).get('metric') or '-'
                                          for r in rows if r['setting'] == row['setting']}))
    print()
    print(C.markdown(summary, [('setting', 'setting', 0), ('pairs', 'subjects', 0),
                               *C.columns('dice_aff', 'dice', 'worst_dice', dice='mean Dice',
                                          worst_dice='worst'),
                               ('picked', 'metric picked', 0)]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
