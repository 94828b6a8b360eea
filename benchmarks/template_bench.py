"""Subject-to-template benchmark at 1 mm: FreeSurfer's bert to MNI152NLin6Asym and to fsaverage.

Pairs (moving -> fixed, both skull-stripped, 1 mm):

- ``mni``: bert ``brain.mgz`` (256^3 LIA) -> ``tpl-MNI152NLin6Asym_res-01_desc-brain_T1w``
  (182x218x182 LAS). Dice over the subcortical FreeSurfer structures of bert's ``aseg`` and the
  template's ``res-01_desc-wmparc_dseg`` (FreeSurfer numbers): every label < 100 present in both
  maps (the cortex and white-matter parcels of wmparc are numbered > 1000 and left out; 2/41
  and 3/42 do not occur in wmparc). Brain mask: ``res-01_desc-brain_mask``.
- ``fsaverage``: bert ``brain.mgz`` -> fsaverage ``brain.mgz`` (256^3 LIA). Dice: mean over
  the 30 largest aseg structures of fsaverage among those present in both maps
  (``evaluate.largest_labels``). Brain mask: fsaverage ``brain.mgz`` > 0.
- ``mni-t2w``: bert ``brain.mgz`` (T1) -> ``tpl-MNI152NLin6Asym_res-01_desc-brain_T2w``, the
  T2-weighted template on the T1w template's grid: the same labels and mask as ``mni``, across
  contrasts (greedy with NMI instead of NCC; ANTs' defaults are already mutual information).
  Not run by default.

Methods: ours through the public API exactly as ``synthmorph-app register`` runs by default
(``-m affine`` and ``-m joint``; ``--refine`` 15 unless ``$SYNTHMORPH_REFINE`` is set, plus
``--ours-options``), antspyx ``Affine`` and ``SyN`` (defaults), greedy (affine, then affine +
deformable, NCC 2x2x2 or the pair's metric, ``-n 100x50x10``; the affine row is the affine
stage of that run). Each in a child process;
bert's aseg is moved onto the fixed grid with nearest neighbour through each transform (one
resampling), and everything is scored by ``synthmorph_app.evaluate``: Dice, MIND-NCC in the
fixed brain, SD of the log Jacobian in the brain, % folding in the brain and on the whole fixed
grid, wall time (and its ratio to greedy's affine + deformable run on the same pair), peak
memory. ``.mgz`` inputs are converted to NIfTI first (greedy and FireANTs' readers need it).

Run from the repository root::

    python benchmarks/template_bench.py                 # mni and fsaverage, all methods
    python benchmarks/template_bench.py --pairs mni-t2w # T1w to the T2w template
    python benchmarks/template_bench.py --pairs mni --methods ours-joint greedy

This is a script, not a timed test. See ``benchmarks/README.md`` for figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import _common as C
import numpy as np

FS = C.DATA / 'freesurfer'
MNI = C.DATA / 'templateflow' / 'tpl-MNI152NLin6Asym'

PAIRS = {
    'mni': {
        'moving': FS / 'bert' / 'mri' / 'brain.mgz',
        'moving_labels': FS / 'bert' / 'mri' / 'aseg.mgz',
        'fixed': MNI / 'tpl-MNI152NLin6Asym_res-01_desc-brain_T1w.nii.gz',
        'fixed_labels': MNI / 'tpl-MNI152NLin6Asym_res-01_desc-wmparc_dseg.nii.gz',
        'brain': MNI / 'tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz',
        'images': 'bert brain.mgz (skull-stripped) -> MNI152NLin6Asym res-01 desc-brain T1w',
        'labels': 'aseg labels < 100 present in both (wmparc, FreeSurfer numbers)',
    },
    'fsaverage': {
        'moving': FS / 'bert' / 'mri' / 'brain.mgz',
        'moving_labels': FS / 'bert' / 'mri' / 'aseg.mgz',
        'fixed': FS / 'fsaverage' / 'mri' / 'brain.mgz',
        'fixed_labels': FS / 'fsaverage' / 'mri' / 'aseg.mgz',
        'brain': None,  # fsaverage brain.mgz > 0
        'images': 'bert brain.mgz (skull-stripped) -> fsaverage brain.mgz (skull-stripped)',
        'labels': '30 largest fsaverage aseg structures present in both',
    },
}

# the T2w template on the T1w template's grid: the same labels and mask as 'mni'
PAIRS['mni-t2w'] = dict(
    PAIRS['mni'],
    fixed=MNI / 'tpl-MNI152NLin6Asym_res-01_desc-brain_T2w.nii.gz',
    images='bert brain.mgz (T1, skull-stripped) -> MNI152NLin6Asym res-01 desc-brain T2w',
    greedy_metric='NMI',  # T1 to T2: greedy's local NCC assumes one contrast
)

METHODS = ('none', 'ours-affine', 'ours-joint', 'ants-affine', 'ants-syn', 'greedy')

COLUMNS = C.columns('pair', 'method', 'dice', 'dice_aff', 'mind_ncc', 'sd_logj', 'fold_brain',
                    'fold_grid', 'time', 'time_ratio', 'peak_mb',
                    dice_aff='Dice of its affine part')


def nifti(path: Path, folder: str) -> str:
    """``path`` itself, or a NIfTI copy of an ``.mgz`` in ``folder`` (same data and affine)."""
    if not str(path).endswith('.mgz'):
        return str(path)
    import nibabel as nb

    img = nb.load(path)
    out = Path(folder) / f'{path.parent.parent.name}_{path.name[:-4]}.nii.gz'
    if not out.exists():
        nb.save(nb.Nifti1Image(np.asarray(img.dataobj), img.affine), out)
    return str(out)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        epilog='Writes all figures to --json and prints a Markdown table.',
    )
    parser.add_argument('--pairs', nargs='+', choices=tuple(PAIRS),
                        default=['mni', 'fsaverage'],
                        help='pairs to run (default: mni and fsaverage)')
    parser.add_argument('--methods', nargs='+', choices=METHODS, default=list(METHODS),
                        help='methods (default: all); none: no registration (the identity in '
                             'world space); greedy gives two rows (affine, affine + deformable)')
    parser.add_argument('--threads', type=int, default=1, help='threads of every method (1)')
    parser.add_argument('--ants-seed', type=int, default=42,
                        help="seed of ANTs' random metric sampling (42); another seed shows "
                             "ANTs' own spread between runs")
    C.add_register_options(parser, '--ours-options', '--refine-levels 8,4,2,1.5')
    parser.add_argument('--json', default=str(C.REPO / 'benchmarks' / 'results' /
                                              'template_bench.json'), help='output JSON')
    args = parser.parse_args(argv)
    C.pin_threads(args.threads)
    import nibabel as nb

    from synthmorph_app import evaluate

    rows = []
    print(f'threads {args.threads}; methods {", ".join(args.methods)}', flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs:
            spec = PAIRS[pair]
            moving_path, fixed_path = nifti(spec['moving'], tmp), nifti(spec['fixed'], tmp)
            moving, fixed = C.load(moving_path), C.load(fixed_path)
            mlab = np.asarray(nb.load(spec['moving_labels']).dataobj).astype(np.float32)
            flab = np.rint(np.asarray(nb.load(spec['fixed_labels']).dataobj)).astype(np.int32)
            common = np.intersect1d(np.unique(flab[flab > 0]), np.unique(mlab[mlab > 0]))
            if pair.startswith('mni'):
                labels = [int(v) for v in common if v < 100]
                brain = np.asarray(nb.load(spec['brain']).dataobj) > 0
            else:
                labels = evaluate.largest_labels(flab, 30, among=common)
                brain = fixed[0] > 0
            grid = np.ones(brain.shape, bool)
            print(f'{pair}: {spec["images"]}; Dice over {len(labels)} labels ({spec["labels"]})',
                  flush=True)
            results = {}
            for method in args.methods:
                if method == 'none':
                    results[method] = C.run_none(moving_path, fixed_path)
                elif method.startswith('ours'):
                    res = C.in_child(C.run_register, moving_path, fixed_path,
                                     method.split('-')[1], args.threads,
                                     args.ours_options)
                    results[method] = res
                elif method.startswith('ants'):
                    kind = 'Affine' if method == 'ants-affine' else 'SyN'
                    results[method] = C.in_child(C.run_ants, moving_path, fixed_path, kind,
                                                 args.threads, seed=args.ants_seed)
                else:
                    res = C.in_child(C.run_greedy, moving_path, fixed_path,
                                     spec.get('greedy_metric', 'NCC 2x2x2'), args.threads)
                    results['greedy-affine'] = dict(res, field=None, time=res['affine_time'])
                    results['greedy-syn'] = res
            pair_rows = []
            for method, res in results.items():
                row = C.result_row(pair, method, res, images=spec['images'], labels=labels)
                kw = {'moving_labels': mlab, 'fixed_labels': flab, 'labels': labels}
                row.update(C.score(res, moving, fixed, mind_mask=brain, sd_mask='brain',
                                   jac_masks={'brain': brain, 'grid': grid}, per_label=True,
                                   **kw))
                if res.get('field') is not None:
                    row['dice_aff'] = C.score(res, moving, fixed, linear=True, **kw)['dice']
                pair_rows.append(row)
                C.print_row(row, ('dice', 'mind_ncc', 'sd_logj', 'fold_brain', 'fold_grid'))
            C.add_time_ratios(pair_rows)
            rows.extend(pair_rows)
            C.write_results(args.json, 'template_bench', argv, rows)
    print()
    print(C.markdown(rows, COLUMNS))
    return 0


if __name__ == '__main__':
    sys.exit(main())
