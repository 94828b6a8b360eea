"""Thick slices: one head imaged with thicker and thicker slices lands where the fine image does.

Clinical scans often come as thick axial slices (3-7 mm). sub-chris's T1w (0.88 mm) is averaged
into slices 2, 4, 6 or 8 times thicker along its voxel axis nearest to superior (partial-volume
averaging, as a thick slice acquires) and registered onto the BIDS-App's default template
(MNI152NLin6Asym res-02, joint, the template's brain mask, local NCC, as the BIDS-App's T1w
job). No labels: each result is compared with the 0.88 mm image's registration, as the distance
between the points they map every 200th voxel of the template's brain mask to (mean and 95th
percentile, mm).

Run from the repository root::

    python benchmarks/thick_slice_bench.py --json benchmarks/results/thick_slice_bench.json

A script, not a timed test. See ``benchmarks/README.md`` ("Session 24").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

TEMPLATE = C.REPO / 'synthmorph_app' / 'data' / 'templateflow' / 'tpl-MNI152NLin6Asym'


def thicken(data: np.ndarray, affine: np.ndarray, axis: int, factor: int):
    """Average ``factor`` neighbouring slices along ``axis``: the data and their affine."""
    moved = np.moveaxis(data, axis, 0)
    count = moved.shape[0] // factor
    thick = moved[: count * factor].reshape(count, factor, *moved.shape[1:]).mean(1)
    out = affine.copy()
    out[:3, axis] *= factor
    out[:3, 3] += affine[:3, axis] * (factor - 1) / 2  # the centre of the first thick slice
    return np.moveaxis(thick, 0, axis), out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--factors', nargs='+', type=int, default=[1, 2, 4, 6, 8],
                        help='slice thickness as a multiple of 0.88 mm (1 2 4 6 8; 1 first: the '
                             'reference)')
    parser.add_argument('--threads', type=int, default=1, help='threads (1)')
    parser.add_argument('--json', default=str(C.REPO / 'benchmarks' / 'results' /
                                              'thick_slice_bench.json'), help='output JSON')
    args = parser.parse_args(argv)
    C.pin_threads(args.threads)
    import nibabel as nb

    from synthmorph_app.engine.register import register
    from synthmorph_app.io.images import load_image

    fixed = load_image(TEMPLATE / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz')
    mask = load_image(TEMPLATE / 'tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz')
    image = load_image(C.DATA / 'bids' / 'sub-chris' / 'anat' / 'sub-chris_T1w.nii.gz')
    data = image.get_fdata(dtype=np.float32)
    points = np.argwhere(mask.get_fdata() > 0)[::200]
    points = points @ mask.affine[:3, :3].T + mask.affine[:3, 3]
    axis = C.superior_axis(image)
    reference, rows = None, []
    for factor in args.factors:
        thick, affine = thicken(data, image.affine, axis, factor)
        t0 = time.perf_counter()
        result = register(nb.Nifti1Image(thick, affine), fixed, mode='joint', refine=15,
                          fixed_mask=mask, refine_metric='lncc')
        elapsed = time.perf_counter() - t0
        found = result.forward.map_points(points)
        reference = found if reference is None else reference
        distance = np.linalg.norm(found - reference, axis=1)
        rows.append({'slice_mm': float(np.linalg.norm(affine[:3, axis])), 'factor': factor,
                     'mean_mm': float(distance.mean()),
                     'p95_mm': float(np.percentile(distance, 95)), 'time': elapsed})
        print(f"slices {rows[-1]['slice_mm']:.1f} mm: {rows[-1]['mean_mm']:.2f} mm mean, "
              f"{rows[-1]['p95_mm']:.2f} mm 95th percentile from the first, {elapsed:.0f} s",
              flush=True)
        C.write_results(args.json, 'thick_slice_bench', argv, rows)
    print()
    print(C.markdown(rows, [('slice_mm', 'slice (mm)', 1), ('mean_mm', 'mean (mm)', 2),
                            ('p95_mm', '95th percentile (mm)', 2), ('time', 'time (s)', 0)]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
