"""Partial fields of view: a slab of a real brain, moved by a known rigid transform, back onto
the whole brain it was cut from.

High-resolution slabs (a 30-60 mm stack of coronal slices through the hippocampus, say) cover a
part of the brain only. Each slab here is cut from bert's ``norm.mgz`` (1 mm, skull-stripped,
conformed LIA) along the anterior axis, and its header is moved by a known rigid transform ``T``
(10 degrees about the first world axis, -8 about the third, then 6 / -4 / 5 mm). The slab
(moving) is registered to the whole ``norm.mgz`` (fixed) by ``synthmorph-app register``. The
true forward transform (fixed RAS -> moving RAS) is ``T``, and the error of a result ``A`` is
the mean over the slab's brain voxels (``aseg`` > 0, every 50th) of ``|A x - T x|`` in mm.

``--contrast`` asks the same of slabs of another contrast, with no ground truth from outside:
axial slabs (along the voxel axis nearest to superior) of sub-chris's PDw (0.86 x 0.86 x 2.4 mm)
and of sub-01..04's FLAIR (2 mm), moved by ``T`` in their headers, onto the same person's T1w.
The reference is where the whole image lands (``register -m rigid`` of the whole PDw or FLAIR,
its header moved by ``T`` too): the error is the mean of ``|A x - R x|`` over the T1w's head
voxels that fall in the slab, the slab's registration judged by its consistency with the whole
image's.

Run from the repository root::

    python benchmarks/slab_bench.py
    python benchmarks/slab_bench.py --slabs 40:108 --modes rigid --options "--init identity"
    python benchmarks/slab_bench.py --contrast --json benchmarks/results/slab_contrast.json

Writes every figure to ``--json`` and prints a Markdown table. A script, not a timed test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

BERT = C.DATA / 'freesurfer' / 'bert' / 'mri'


def true_transform() -> np.ndarray:
    """10 degrees about the first world axis, then -8 about the third (intrinsic), then a
    (6, -4, 5) mm shift."""
    from scipy.spatial.transform import Rotation

    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler('XZ', [10, -8], degrees=True).as_matrix()
    out[:3, 3] = [6.0, -4.0, 5.0]
    return out


def _slab_spec(text: str) -> tuple[int, int]:
    width, start = (int(v) for v in text.split(':'))
    if width < 1 or not 0 <= start < 256:
        raise argparse.ArgumentTypeError(f'WIDTH:START in voxels of the 256^3 grid, got {text}')
    return width, start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--slabs', nargs='+', type=_slab_spec,
                        default=[(30, 95), (40, 108), (60, 98), (120, 68), (256, 0)],
                        metavar='WIDTH:START',
                        help='slabs: width and first index along the anterior voxel axis, in '
                             'mm (1 mm voxels); default 30:95 40:108 60:98 120:68 256:0 (the '
                             'whole image)')
    parser.add_argument('--modes', nargs='+', default=['rigid', 'affine'],
                        choices=('rigid', 'affine'), help='register modes (rigid affine)')
    parser.add_argument('--options', default='',
                        help='further register options, one string (e.g. "--init identity")')
    parser.add_argument('--threads', type=int, default=1, help='threads (1)')
    parser.add_argument('--contrast', action='store_true',
                        help='slabs of a PDw or FLAIR onto the same person\'s T1w (--widths)')
    parser.add_argument('--widths', nargs='+', type=float, default=[30.0, 40.0, 60.0],
                        metavar='MM', help='slab widths for --contrast (30 40 60 mm)')
    parser.add_argument('--json', default=str(C.REPO / 'benchmarks' / 'results' /
                                              'slab_bench.json'), help='output JSON')
    args = parser.parse_args(argv)
    if args.contrast:
        return contrast_main(args, argv)
    import nibabel as nb

    norm = nb.load(str(BERT / 'norm.mgz'))
    data = np.asarray(norm.dataobj, dtype=np.float32)
    brain = np.asarray(nb.load(str(BERT / 'aseg.mgz')).dataobj) > 0
    true = true_transform()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fixed = Path(tmp) / 'whole.nii.gz'
        nb.save(nb.Nifti1Image(data, norm.affine), fixed)
        for width, start in args.slabs:
            stop = min(start + width, data.shape[2])
            offset = np.eye(4)
            offset[2, 3] = start
            moving = Path(tmp) / f'slab_{width}_{start}.nii.gz'
            nb.save(nb.Nifti1Image(data[:, :, start:stop], true @ norm.affine @ offset), moving)
            ijk = np.argwhere(brain[:, :, start:stop])[::50] + [0, 0, start]
            ras = ijk @ norm.affine[:3, :3].T + norm.affine[:3, 3]
            expected = ras @ true[:3, :3].T + true[:3, 3]
            before = float(np.linalg.norm(ras - expected, axis=1).mean())
            for mode in args.modes:
                xfm, elapsed, failed = _register(moving, fixed, Path(tmp) / f'{mode}.txt',
                                                 args, mode)
                row = {'slab_mm': stop - start, 'start': start, 'mode': mode,
                       'options': args.options, 'error_before': before, 'time': elapsed}
                rows.append(_scored(row, xfm, failed, ras, expected))
                print(f"slab {row['slab_mm']} mm from {start}, {mode}: error "
                      f"{C.fmt(row.get('error'), 2)} mm (before {before:.1f} mm), "
                      f'{elapsed:.1f} s', flush=True)
                C.write_results(args.json, 'slab_bench', argv, rows)
    print()
    print(C.markdown(rows, [('slab_mm', 'slab (mm)', 0), ('start', 'first index', 0),
                            ('mode', 'mode', 0), ('error_before', 'error before (mm)', 1),
                            ('error', 'mean error (mm)', 2), ('error_max', 'max (mm)', 2)]))
    return 0


def _scored(row: dict, xfm, failed: str, points: np.ndarray, expected: np.ndarray) -> dict:
    """``row`` with the mean and largest distance (mm) between where ``xfm`` maps ``points``
    and ``expected``, or with why the registration failed (``xfm`` None)."""
    if xfm is None:
        row['failed'] = failed
    else:
        err = np.linalg.norm(xfm.map_points(points) - expected, axis=1)
        row.update(error=float(err.mean()), error_max=float(err.max()))
    return row


def _register(moving, fixed, out, args, mode: str = 'rigid') -> tuple[object, float, str]:
    """``register -m MODE`` as a command: (transform or None, seconds, stderr tail)."""
    from synthmorph_app.io.transforms import load_transform

    cmd = ['synthmorph-app', 'register', '-m', mode, '-j', str(args.threads),
           *args.options.split(), str(moving), str(fixed), '-t', str(out)]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, check=False, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if run.returncode:
        return None, elapsed, run.stderr[-500:]
    return load_transform(out), elapsed, ''


def contrast_main(args, argv) -> int:
    """Slabs of a PDw or FLAIR onto the same person's T1w, judged against the whole image."""
    import nibabel as nb

    bids = C.DATA / 'bids'
    pairs = [('chris', 'PDw')] + [(f'{i:02d}', 'FLAIR') for i in range(1, 5)]
    true = true_transform()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sub, contrast in pairs:
            anat = bids / f'sub-{sub}' / 'anat'
            image = nb.load(str(anat / f'sub-{sub}_{contrast}.nii.gz'))
            t1w = nb.load(str(anat / f'sub-{sub}_T1w.nii.gz'))
            data = np.asarray(image.dataobj, dtype=np.float32)
            whole = Path(tmp) / f'{sub}_whole.nii.gz'
            nb.save(nb.Nifti1Image(data, true @ image.affine), whole)
            reference, _, failed = _register(whole, anat / f'sub-{sub}_T1w.nii.gz',
                                             Path(tmp) / 'whole.txt', args)
            if reference is None:
                print(f'sub-{sub} {contrast}: the whole image failed: {failed}')
                continue
            # the T1w's head voxels (every 4th along each axis)
            t1 = np.asarray(t1w.dataobj, dtype=np.float32)
            ijk = np.argwhere(t1[::4, ::4, ::4] > np.percentile(t1, 60)) * 4
            ras = ijk @ t1w.affine[:3, :3].T + t1w.affine[:3, 3]
            expected = reference.map_points(ras)
            axis = C.superior_axis(image)
            spacing = float(image.header.get_zooms()[axis])
            for width in args.widths:
                count = max(2, round(width / spacing))
                start = (data.shape[axis] - count) // 2
                cut = [slice(None)] * 3
                cut[axis] = slice(start, start + count)
                offset = np.eye(4)
                offset[axis, 3] = start
                slab = nb.Nifti1Image(data[tuple(cut)], true @ image.affine @ offset)
                moving = Path(tmp) / f'{sub}_slab_{width:g}.nii.gz'
                nb.save(slab, moving)
                # the T1w points that fall in the slab, by the whole image's registration
                vox = (expected - slab.affine[:3, 3]) @ np.linalg.inv(slab.affine[:3, :3]).T
                inside = np.all((vox >= 0) & (vox <= np.array(slab.shape) - 1), axis=1)
                found, elapsed, failed = _register(moving, anat / f'sub-{sub}_T1w.nii.gz',
                                                   Path(tmp) / 'slab.txt', args)
                row = {'subject': sub, 'contrast': contrast, 'slab_mm': count * spacing,
                       'slices': count, 'points': int(inside.sum()), 'options': args.options,
                       'time': elapsed}
                rows.append(_scored(row, found, failed, ras[inside], expected[inside]))
                print(f"sub-{sub} {contrast} slab {row['slab_mm']:.0f} mm ({count} slices): "
                      f"error {C.fmt(row.get('error'), 2)} mm, {elapsed:.1f} s", flush=True)
                C.write_results(args.json, 'slab_bench --contrast', argv, rows)
    print()
    print(C.markdown(rows, [('subject', 'subject', 0), ('contrast', 'contrast', 0),
                            ('slab_mm', 'slab (mm)', 0), ('error', 'mean error (mm)', 2),
                            ('error_max', 'max (mm)', 2), ('time', 'time (s)', 1)]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
