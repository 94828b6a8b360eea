"""Fine inputs: time and peak memory of ``register`` and of moving an image onto a 0.4 mm grid.

bert's ``norm.mgz`` (1 mm, skull-stripped) cropped to its head's box and resampled to 0.4 mm
(350 x 402 x 492 voxels, 69 million) stands in for a high-resolution scan, against the 2 mm
MNI152NLin6Asym T1w (with head). Both directions run, each in its own child process that
reports its peak resident memory (``VmHWM``):

* ``moving 0.4 mm``: the fine image onto the template (outputs on the 2 mm grid);
* ``fixed 0.4 mm``: the template onto the fine image (the moved template written on the
  0.4 mm grid, as a BIDS-App user asking for native-space outputs gets).

Each child runs ``register`` (joint, the defaults; ``--refine-levels`` to change its levels) and
then ``moved_image``; the time of each stage and the peak memory of the whole child are
reported.

Run from the repository root::

    python benchmarks/highres_bench.py --json benchmarks/results/highres_bench.json

A script, not a timed test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

# torch-free: the parser of `register --refine-levels` itself
from synthmorph_app.cli.parser import _levels as register_levels

BERT = C.DATA / 'freesurfer' / 'bert' / 'mri' / 'norm.mgz'
TEMPLATE = (C.DATA / 'templateflow' / 'tpl-MNI152NLin6Asym' /
            'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz')


def fine_image(path: Path, voxel: float) -> tuple[int, ...]:
    """Write bert cropped to its head and resampled to ``voxel`` mm (linear) to ``path``."""
    import nibabel as nb
    from scipy import ndimage

    img = nb.load(str(BERT))
    data = np.asarray(img.dataobj, np.float32)
    idx = np.argwhere(data > 0)
    lo, hi = idx.min(0) - 4, idx.max(0) + 5
    data = data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ lo + img.affine[:3, 3]
    zoom = 1.0 / voxel
    fine = ndimage.zoom(data, zoom, order=1)
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] * voxel
    # voxel 0 of the fine grid at the first fine sample, half a coarse voxel in from the edge
    out[:3, 3] = affine[:3, :3] @ np.full(3, (voxel - 1) / 2) + affine[:3, 3]
    nb.save(nb.Nifti1Image(fine.astype(np.int16), out), str(path))
    return fine.shape


def run_case(moving: str, fixed: str, threads: int, refine_levels=None) -> dict:
    """``register`` then ``moved_image`` of the moving image onto the fixed grid."""
    torch = C._torch_threads()
    torch.set_num_threads(threads)
    from synthmorph_app.engine.register import moved_image, register
    from synthmorph_app.io.images import load_image

    mimg, fimg = load_image(moving), load_image(fixed)
    t0 = time.perf_counter()
    result = register(mimg, fimg, refine=15, refine_levels=refine_levels)
    t1 = time.perf_counter()
    moved = moved_image(mimg, result.forward)
    np.asarray(moved.dataobj)
    t2 = time.perf_counter()
    return {'register_s': t1 - t0, 'moved_image_s': t2 - t1}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--voxel', type=float, default=0.4, help='fine voxel size, mm (0.4)')
    parser.add_argument('--threads', type=int, default=1, help='threads (1)')
    parser.add_argument('--refine-levels', type=register_levels, metavar='MM,MM,..',
                        help="register's refinement levels (its default)")
    parser.add_argument('--json', default=str(C.REPO / 'benchmarks' / 'results' /
                                              'highres_bench.json'), help='output JSON')
    args = parser.parse_args(argv)
    C.pin_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fine = Path(tmp) / 'bert_fine.nii.gz'
        shape = fine_image(fine, args.voxel)
        print(f'bert at {args.voxel} mm: {shape}, {np.prod(shape) / 1e6:.0f} million voxels',
              flush=True)
        for case, moving, fixed in ((f'moving {args.voxel} mm', fine, TEMPLATE),
                                    (f'fixed {args.voxel} mm', TEMPLATE, fine)):
            res = C.in_child(run_case, str(moving), str(fixed), args.threads, args.refine_levels)
            row = {'case': case, 'shape': list(shape), 'refine_levels': args.refine_levels, **res}
            rows.append(row)
            print(f"{case}: register {res['register_s']:.1f} s, moved_image "
                  f"{res['moved_image_s']:.1f} s, peak {res['peak_mb']:.0f} MB", flush=True)
    C.write_results(args.json, 'highres_bench', argv, rows)
    print()
    print(C.markdown(rows, [('case', 'case', 0), ('register_s', 'register (s)', 1),
                            ('moved_image_s', 'moved_image (s)', 1),
                            ('peak_mb', 'peak memory (MB)', 0)]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
