"""Cross-contrast, same-subject benchmark: PDw -> T1w and FLAIR -> T1w, with a figure.

Pairs (moving -> fixed, from ``../shared/data/bids``, whole head):

- ``chris``: ``sub-chris_PDw`` (0.86x0.86x2.4 mm) -> ``sub-chris_T1w`` (0.88 mm);
- ``01``, ``04``, ... : ``sub-XX_FLAIR`` (2 mm, own grid) -> ``sub-XX_T1w`` (2 mm).

No labels on both sides, so no Dice: MIND-NCC (``synthmorph_app.evaluate.mind_ncc``) of the
moved image and the fixed T1w inside the fixed brain (the DLMUSE label map > 0 where one exists on
the T1w grid, else ``engine.masks.brain_weight`` > 0.5 of the T1w) and inside the fixed head
(``engine.masks.head_mask``, whole head with neck); % folding in the brain and in the head; SD of
the log Jacobian in the brain; wall time, also as a ratio to greedy's affine + deformable run on
the same pair; peak memory. MIND-NCC flatters methods that optimise MIND (ours with the ``mind``
metric, ConvexAdam), which is why the script also draws the moved FLAIR over the T1w.

Methods: ours through the public API as ``synthmorph-app register`` runs by default (``-m
joint`` and ``-m affine``; ``--refine`` 20 unless ``$SYNTHMORPH_REFINE`` is set); greedy with NMI
(affine, then deformable; ``-n 100x50x10``; the affine row is the affine stage of that run);
antspyx ``Affine`` and ``SyN`` with their default metric (Mattes MI); with ``--convexadam``,
ConvexAdam (MIND-SSC) after antspyx ``Affine``. Each runs in its own child process.

Figure (``--figure``, default ``benchmarks/figures/contrast_flair_t1w.png``): for one FLAIR
pair, three orthogonal slices of the moved FLAIR with the T1w's brain outline (DLMUSE > 0) and
white-matter boundary (an intensity contour of the smoothed T1w) drawn over it, one row per
method (ours joint, greedy, ConvexAdam).

Run from the repository root::

    python benchmarks/contrast_bench.py --convexadam
    python benchmarks/contrast_bench.py --pairs 01 --methods ours-joint greedy

This is a script, not a timed test. See ``benchmarks/README.md`` for figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _common as C
import numpy as np

BIDS = C.DATA / 'bids'
FLAIR_SUBJECTS = ('01', '04', '07', '10')
METHODS = ('ours-joint', 'ours-affine', 'greedy', 'ants-affine', 'ants-syn', 'convexadam')

COLUMNS = C.columns('pair', 'method', 'mind_brain', 'mind_head', 'fold_brain', 'fold_head',
                    'sd_logj', 'time', 'time_ratio', 'peak_mb')
SUMMARY = [('method', 'method', 0), ('pairs', 'pairs', 0), *COLUMNS[2:]]


def pair_files(name: str) -> dict:
    if name == 'chris':
        anat = BIDS / 'sub-chris' / 'anat'
        return {'moving': anat / 'sub-chris_PDw.nii.gz', 'fixed': anat / 'sub-chris_T1w.nii.gz',
                'labels': None, 'what': 'sub-chris PDw -> T1w'}
    anat = BIDS / f'sub-{name}' / 'anat'
    lab = C.dlmuse_labels(name)
    return {'moving': anat / f'sub-{name}_FLAIR.nii.gz', 'fixed': anat / f'sub-{name}_T1w.nii.gz',
            'labels': lab if lab.exists() else None, 'what': f'sub-{name} FLAIR -> T1w'}


def _canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``data`` reoriented to RAS axis order (for display only)."""
    import nibabel as nb

    ornt = nb.orientations.io_orientation(affine)
    return nb.orientations.apply_orientation(data, ornt)


def draw_figure(path: str, title: str, fixed, brain: np.ndarray, panels: dict) -> None:
    """Rows: methods (``panels``: name -> moved image on the fixed grid); columns: sagittal,
    coronal, axial slices through the brain's centre; T1w contours drawn over each."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from scipy import ndimage

    from synthmorph_app.engine.masks import otsu_threshold

    fdata, fgrid = fixed
    t1 = _canonical(ndimage.gaussian_filter(fdata, 0.7), fgrid.affine)
    br = _canonical(brain.astype(np.float32), fgrid.affine)
    # a WM/GM level: Otsu of the T1w inside the brain, above the brain's median (CSF and GM
    # lie mostly below it)
    inside = t1[br > 0.5]
    level = otsu_threshold(inside[inside > np.median(inside)])
    centre = [round(c) for c in ndimage.center_of_mass(br)]
    import nibabel as nb

    ornt = nb.orientations.io_orientation(fgrid.affine)
    zooms = np.empty(3)
    zooms[ornt[:, 0].astype(int)] = np.sqrt((fgrid.affine[:3, :3] ** 2).sum(0))

    # the WM contour inside the brain only; panels cropped to the brain and a 12-voxel margin
    t1 = np.where(ndimage.binary_dilation(br > 0.5, iterations=2), t1, 0)
    idx = np.nonzero(br > 0.5)
    box = [slice(max(int(i.min()) - 12, 0), int(i.max()) + 13) for i in idx]

    def cut(vol, axis):
        plane = np.take(vol, centre[axis], axis=axis)
        rest = [box[a] for a in range(3) if a != axis]
        return plane[rest[0], rest[1]].T

    fig, axes = plt.subplots(len(panels), 3, figsize=(9, 3.1 * len(panels)), squeeze=False)
    for r, (name, img) in enumerate(panels.items()):
        img = _canonical(img, fgrid.affine)
        lo, hi = np.percentile(img[br > 0.5], [1, 99.5])
        for c in range(3):
            ax = axes[r, c]
            p, q = [a for a in range(3) if a != c]
            ax.imshow(cut(img, c), cmap='gray', vmin=lo, vmax=hi, origin='lower',
                      interpolation='bilinear', aspect=zooms[q] / zooms[p])
            ax.contour(cut(t1, c), levels=[level], colors='red', linewidths=0.6)
            ax.contour(cut(br, c), levels=[0.5], colors='cyan', linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=11)
    for c, label in enumerate(('sagittal', 'coronal', 'axial')):
        axes[0, c].set_title(label, fontsize=11)
    fig.suptitle(f'{title}: moved FLAIR; T1w white-matter boundary (red), brain outline (cyan)',
                 fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.set_dpi(72)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    from PIL import Image

    # a 256-colour palette keeps the PNG small enough to commit (< 300 KB)
    Image.fromarray(rgba[..., :3]).quantize(256).save(path, optimize=True)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        epilog='Writes all figures to --json and prints Markdown tables.',
    )
    parser.add_argument('--pairs', nargs='+', default=['chris', *FLAIR_SUBJECTS],
                        help='chris and/or subject numbers XX of sub-XX FLAIR -> T1w pairs '
                             f'(default: chris {" ".join(FLAIR_SUBJECTS)})')
    parser.add_argument('--methods', nargs='+', choices=METHODS, default=list(METHODS[:-1]),
                        help='methods (default: all but convexadam); greedy gives two rows '
                             '(affine, affine + deformable)')
    parser.add_argument('--convexadam', action='store_true', help='add ConvexAdam (MIND-SSC, '
                        'after antspyx Affine)')
    parser.add_argument('--threads', type=int, default=1, help='threads of every method (1)')
    C.add_register_options(parser, '--ours-options',
                           '-w affine -w training/deform-cv/deform.pt')
    parser.add_argument('--json', default=str(C.REPO / 'benchmarks' / 'results' /
                                              'contrast_bench.json'), help='output JSON')
    parser.add_argument('--figure', default=str(C.REPO / 'benchmarks' / 'figures' /
                                                'contrast_flair_t1w.png'),
                        help='PNG of the first FLAIR pair run ("" for none)')
    args = parser.parse_args(argv)
    for name in args.pairs:
        if name != 'chris' and not (BIDS / f'sub-{name}').is_dir():
            parser.error(f'no subject sub-{name} in {BIDS}')
    methods = list(dict.fromkeys(args.methods + (['convexadam'] if args.convexadam else [])))
    C.pin_threads(args.threads)
    import nibabel as nb

    from synthmorph_app.engine import masks

    rows = []
    figure_done = not args.figure
    print(f'threads {args.threads}; methods {", ".join(methods)}', flush=True)
    for pair in args.pairs:
        files = pair_files(pair)
        moving, fixed = C.load(files['moving']), C.load(files['fixed'])
        if files['labels'] is not None:
            brain = np.asarray(nb.load(files['labels']).dataobj) > 0
            brain_src = 'DLMUSE > 0'
        else:
            brain = masks.brain_weight(fixed[0], fixed[1]) > 0.5
            brain_src = 'masks.brain_weight > 0.5'
        head = masks.head_mask(fixed[0], fixed[1], top_mm=None)
        print(f'{pair}: {files["what"]}; brain mask: {brain_src} ({int(brain.sum())} voxels); '
              f'head {int(head.sum())} voxels', flush=True)
        mov, fix = str(files['moving']), str(files['fixed'])
        results = {}
        for method in methods:
            if method.startswith('ours'):
                results[method] = C.in_child(C.run_register, mov, fix, method.split('-')[1],
                                             args.threads, args.ours_options)
            elif method == 'greedy':
                res = C.in_child(C.run_greedy, mov, fix, 'NMI', args.threads)
                results['greedy-affine'] = dict(res, field=None, time=res['affine_time'])
                results['greedy-syn'] = res
            elif method.startswith('ants'):
                kind = 'Affine' if method == 'ants-affine' else 'SyN'
                results[method] = C.in_child(C.run_ants, mov, fix, kind, args.threads)
            else:
                results[method] = C.in_child(C.run_convexadam, mov, fix, args.threads, 'ants')
        pair_rows = []
        for method, res in results.items():
            row = C.result_row(pair, method, res, brain_mask=brain_src, what=files['what'])
            row['mind_brain'] = C.score(res, moving, fixed, mind_mask=brain)['mind_ncc']
            row.update(C.score(res, moving, fixed, mind_mask=head, sd_mask='brain',
                               jac_masks={'brain': brain, 'head': head}))
            row['mind_head'] = row.pop('mind_ncc')
            if res.get('info', {}).get('refine'):
                row['refine'] = res['info']['refine']
            pair_rows.append(row)
            C.print_row(row, ('mind_brain', 'mind_head', 'fold_brain', 'fold_head', 'sd_logj'),
                        width=13)
        C.add_time_ratios(pair_rows)
        rows.extend(pair_rows)
        if not figure_done and pair != 'chris':
            shown = {'ours (register, joint)': 'ours-joint', 'greedy (NMI)': 'greedy-syn',
                     'ConvexAdam (MIND)': 'convexadam'}
            panels = {}
            for label, key in shown.items():
                if key in results:
                    xfm = C.as_transform(results[key], fixed[1], moving[1])
                    panels[label] = C.moved(moving[0], moving[1], xfm, fixed[1])
            if panels:
                draw_figure(args.figure, files['what'], fixed, brain, panels)
                print(f'figure: {args.figure}', flush=True)
                figure_done = True
        summary = C.summarise(rows, [k for k, _, _ in SUMMARY[2:]])
        C.write_results(args.json, 'contrast_bench', argv, rows, summary=summary)
    print()
    print(C.markdown(rows, COLUMNS))
    print()
    print(C.markdown(summary, SUMMARY))
    return 0


if __name__ == '__main__':
    sys.exit(main())
