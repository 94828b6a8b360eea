"""A mirror of the shared data whose T1w images have a clipped field of view.

Clinical and fMRI-minded protocols often set a tight field of view: the top of the head, and
with it the top of the cortex, falls outside the image (``top``), or the cerebellum is cut
below (``bottom``). This writes a copy of ``bids/`` in which every T1w is cropped along its voxel
axis nearest to superior: ``--cut top:MM`` keeps what lies below the top of the brain less
``MM`` mm, ``--cut bottom:MM`` what lies above the bottom of the brain plus ``MM`` mm (the brain:
the subject's DLMUSE labels > 0). The cropped image keeps its world coordinates (its header
moves with the crop), so its DLMUSE labels, left uncropped on the original grid, still score
the whole brain: ``mni_head_bench.py`` moves them with the registration of the cropped image.
The other images, the label maps and the templates are linked::

    python benchmarks/fov_data.py /tmp/fov/top20 --cut top:20
    SYNTHMORPH_SHARED_DATA=/tmp/fov/top20 python benchmarks/mni_head_bench.py --settings ...

A script, not a test; see ``benchmarks/README.md`` ("Session 27: clipped fields of view").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def _cut(text: str) -> tuple[str, float]:
    side, _, mm = text.partition(':')
    if side not in ('top', 'bottom') or not mm:
        raise argparse.ArgumentTypeError(f'expected top:MM or bottom:MM, got {text!r}')
    return side, float(mm)


def crop(image, labels, side: str, mm: float):
    """``image`` (nibabel, on the labels' grid) cropped along its superior axis ``mm`` into
    the brain from ``side``; returns the new image and the share of brain voxels cut."""
    import nibabel as nb

    axis = C.superior_axis(image)
    brain = np.asarray(labels.dataobj) > 0
    # world S of each index along the axis (the other indices at 0: the axis runs along S)
    step = image.affine[2, axis]
    index = np.arange(image.shape[axis])
    s_of = image.affine[2, 3] + step * index
    along = np.any(brain, axis=tuple(a for a in range(3) if a != axis))
    top, bottom = s_of[along].max(), s_of[along].min()
    keep = s_of <= top - mm if side == 'top' else s_of >= bottom + mm
    lo, hi = int(index[keep].min()), int(index[keep].max()) + 1
    slicer = [slice(None)] * 3
    slicer[axis] = slice(lo, hi)
    data = np.asanyarray(image.dataobj)[tuple(slicer)]
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.eye(3)[axis] * lo + image.affine[:3, 3]
    out = nb.Nifti1Image(data, affine, image.header)
    out.set_sform(affine, code=1)
    out.set_qform(affine, code=1)
    kept = brain[tuple(slicer)].sum()
    return out, 1 - kept / brain.sum()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out', help='the mirror folder to write (replaced)')
    parser.add_argument('--cut', type=_cut, required=True, metavar='top:MM|bottom:MM')
    args = parser.parse_args(argv)

    side, mm = args.cut

    def alter(image, labels):
        cropped, share = crop(image, labels, side, mm)
        return cropped, f'{cropped.shape}, {100 * share:.1f} % of the brain cut'

    C.mirror_t1w(args.out, alter)
    return 0


if __name__ == '__main__':
    sys.exit(main())
