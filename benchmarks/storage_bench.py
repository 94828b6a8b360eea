"""The same image stored differently: how far does the registration move?

A registration should depend on the head in the image, not on how the file stores it. Each
variant below holds the same head as the original file (a whole-head T1w of the shared BIDS
dataset, 2 mm, LPS, uint8 with a scale factor); each is registered to the same template
(MNI152NLin6Asym res-02 T1w) by each method, and compared with the original's result: the gap is
``|T_variant(x) - T_original(x)|`` (mm) over the template's brain (``res-01_desc-brain_mask``,
every 40th voxel). Variants:

- ``PIR``, ``RSA``, ``ASL``: the same voxels stored in another axis order and direction (what
  another DICOM converter may write); only the storage changes;
- ``float32``: the scaled values stored as float32 (no scale factor);
- ``int16x7``: the values times 7, rounded, stored as big-endian int16;
- ``scaled1e-4``: the values times 1e-4 (float32): every similarity used is blind to scale;
- ``padded``: 40 empty voxels added on every side (a larger field of view);
- ``1mm``: resampled to 1 mm (linear interpolation): the same head, another grid.

The first four change nothing a registration should see (the reorders not even a bit of a
value); the last four change the input slightly. ``ours`` is ``synthmorph-app register`` with
its defaults (``-m joint`` or ``-m affine``); ``greedy`` is the benchmarks' greedy (NCC 2x2x2,
image centres, then its deformable step in joint mode).

Run from the repository root::

    python benchmarks/storage_bench.py --json benchmarks/results/storage_bench.json

A script, not a timed test: it prints a Markdown table and writes every figure to ``--json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

TEMPLATE = C.DATA / 'templateflow' / 'tpl-MNI152NLin6Asym'
VARIANTS = ('PIR', 'RSA', 'ASL', 'float32', 'int16x7', 'scaled1e-4', 'padded', '1mm')
METHODS = ('ours', 'greedy')


def write_variant(name: str, image, path: Path) -> None:
    """Write the variant ``name`` of ``image`` (a nibabel image) to ``path``."""
    import nibabel as nb
    from scipy import ndimage

    orient = nb.orientations
    if name in ('PIR', 'RSA', 'ASL'):
        change = orient.ornt_transform(orient.io_orientation(image.affine),
                                       orient.axcodes2ornt(tuple(name)))
        nb.save(image.as_reoriented(change), path)
        return
    data = image.get_fdata(dtype=np.float32)
    affine = image.affine.copy()
    if name == 'float32':
        out = nb.Nifti1Image(data, affine)
    elif name == 'int16x7':
        out = nb.Nifti1Image(np.round(data * 7).astype('>i2'), affine)
    elif name == 'scaled1e-4':
        out = nb.Nifti1Image(data * np.float32(1e-4), affine)
    elif name == 'padded':
        affine[:3, 3] -= affine[:3, :3] @ np.full(3, 40.0)
        out = nb.Nifti1Image(np.pad(data, 40), affine)
    elif name == '1mm':
        factor = image.header.get_zooms()[:3]
        zoom = np.asarray(factor) / 1.0
        fine = ndimage.zoom(data, zoom, order=1, grid_mode=True, mode='grid-constant')
        scale = np.diag([*(1.0 / zoom), 1.0])
        scale[:3, 3] = (1.0 / zoom - 1) / 2  # voxel centres of the finer grid in the old one
        out = nb.Nifti1Image(fine.astype(np.float32), affine @ scale)
    else:
        raise ValueError(f'unknown variant {name!r}')
    out.set_qform(out.affine, code=1)
    out.set_sform(out.affine, code=1)
    nb.save(out, path)


def run(method: str, moving: str, fixed: str, mode: str, threads: int) -> dict:
    if method == 'ours':
        return C.in_child(C.run_register, moving, fixed, mode, threads)
    if method == 'greedy':
        return C.in_child(C.run_greedy, moving, fixed, threads=threads,
                          deformable=mode == 'joint')
    raise ValueError(f'unknown method {method!r}')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--subject', default='01', help='moving T1w of the shared BIDS dataset')
    p.add_argument('--modes', nargs='+', choices=('joint', 'affine'), default=['joint', 'affine'])
    p.add_argument('--methods', nargs='+', choices=METHODS, default=list(METHODS))
    p.add_argument('--variants', nargs='+', choices=VARIANTS, default=list(VARIANTS))
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--json', help='write every figure here')
    args = p.parse_args(argv)
    C.pin_threads(args.threads)
    import nibabel as nb

    from synthmorph_app.io.images import Geometry

    original = C.DATA / 'bids' / f'sub-{args.subject}' / 'anat' / f'sub-{args.subject}_T1w.nii.gz'
    fixed = TEMPLATE / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz'
    mask = nb.load(TEMPLATE / 'tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz')
    points = nb.affines.apply_affine(mask.affine, np.argwhere(mask.get_fdata() > 0)[::40])
    fixed_grid = Geometry.from_image(nb.load(fixed))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {'original': str(original)}
        for name in args.variants:
            paths[name] = f'{tmp}/{name}.nii.gz'
            write_variant(name, nb.load(original), Path(paths[name]))
        for mode in args.modes:
            for method in args.methods:
                reference = None
                for name, path in paths.items():
                    result = run(method, path, str(fixed), mode, args.threads)
                    xfm = C.as_transform(result, fixed_grid, Geometry.from_image(nb.load(path)))
                    mapped = xfm.map_points(points)
                    if reference is None:
                        reference = mapped
                        continue
                    gap = np.linalg.norm(mapped - reference, axis=1)
                    row = {'mode': mode, 'method': method, 'variant': name,
                           'mean': float(gap.mean()), 'p95': float(np.percentile(gap, 95)),
                           'max': float(gap.max()), 'over_2mm': float(100 * (gap > 2).mean()),
                           'time': result['time']}
                    rows.append(row)
                    print(f"{mode:6s} {method:6s} {name:10s} mean {row['mean']:.3f} "
                          f"p95 {row['p95']:.3f} max {row['max']:.3f} mm, "
                          f"{row['over_2mm']:.2f} % > 2 mm ({row['time']:.1f} s)", flush=True)
    print('\n| mode | method | variant | mean gap (mm) | 95th pct | max | % over 2 mm |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['mode']} | {r['method']} | {r['variant']} | {r['mean']:.3f} | "
              f"{r['p95']:.3f} | {r['max']:.2f} | {r['over_2mm']:.2f} |")
    if args.json:
        C.write_results(args.json, 'storage_bench', argv, rows, subject=args.subject)
    return 0


if __name__ == '__main__':
    sys.exit(main())
