"""A mirror of the shared data whose T1w images are skull-stripped.

Some open datasets share their anatomical scans skull-stripped, and pipelines often register a
stripped brain. This writes a copy of ``bids/`` in which every T1w with DLMUSE labels keeps only
its brain: the voxels of the labels (> 0), closed and filled, grown by ``--margin`` mm (a little
CSF, as a stripping tool leaves), every other voxel set to zero. The image keeps its grid, so its
DLMUSE labels still score it; the other images, the label maps and the templates are linked::

    python benchmarks/strip_data.py /tmp/stripped
    SYNTHMORPH_SHARED_DATA=/tmp/stripped python benchmarks/mni_head_bench.py --settings ...

A script, not a test; see ``benchmarks/README.md`` ("Session 35: skull-stripped T1w").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def strip(image, labels, margin_mm: float):
    """``image`` (nibabel, on the labels' grid) with zero outside the brain of ``labels``
    (closed, filled, grown by ``margin_mm``); returns the new image and the brain's volume (ml)."""
    import nibabel as nb
    from scipy import ndimage

    zooms = np.asarray(image.header.get_zooms()[:3], float)
    brain = np.asarray(labels.dataobj) > 0
    brain = ndimage.binary_closing(brain, iterations=2) | brain
    brain = ndimage.binary_fill_holes(brain)
    if margin_mm > 0:
        outside = ndimage.distance_transform_edt(~brain, sampling=zooms)
        brain = outside <= margin_mm
    data = np.asanyarray(image.dataobj)
    out = nb.Nifti1Image(np.where(brain, data, 0).astype(data.dtype), image.affine,
                         image.header)
    return out, float(brain.sum() * zooms.prod() / 1000)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out', help='the mirror folder to write (replaced)')
    parser.add_argument('--margin', type=float, default=2.0,
                        help='mm grown around the labels (default 2)')
    args = parser.parse_args(argv)

    def alter(image, labels):
        stripped, ml = strip(image, labels, args.margin)
        return stripped, f'brain {ml:.0f} ml kept'

    C.mirror_t1w(args.out, alter)
    return 0


if __name__ == '__main__':
    sys.exit(main())
