"""A mirror of the shared data whose T1w images carry an artefact of another scanner.

Two artefacts the shared scans (1.5 and 3 T, MPRAGE-like) do not show, but open datasets do:

- ``uni``: the background of an MP2RAGE ``UNI`` image. Its ratio of two inversions is
  undefined where there is no signal, so the air around the head is salt-and-pepper noise over
  the whole intensity range (values uniform in [0, the 99.5th percentile]). The head, where it
  is kept, is a generous mask of the image (smoothed by 2 voxels above a tenth of the bright
  level, closed, filled, dilated by 2 voxels).
- ``bias``: the strong smooth intensity non-uniformity of a 7 T scan: the image times a field
  from about 0.4 to 1.6 (``1 + 0.65 tanh(0.9 x + 0.6 z - 0.4 y^2)`` over the voxel axes scaled
  to [-1, 1]), bright on one side and dark on the other.

Only each subject's ``T1w`` changes; its other images, the label maps and the templates are
linked. Point ``SYNTHMORPH_SHARED_DATA`` at the output to run a benchmark on it::

    python benchmarks/artefact_data.py /tmp/uni/data --kind uni
    SYNTHMORPH_SHARED_DATA=/tmp/uni/data python benchmarks/mni_head_bench.py --settings ...

A script, not a test; see ``benchmarks/README.md`` ("Session 25: MP2RAGE backgrounds and 7 T
bias").
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

KINDS = ('uni', 'bias')


def with_artefact(data: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``data`` (a 3D float array) with the artefact ``kind``."""
    from scipy import ndimage

    if kind == 'uni':
        bright = float(np.percentile(data, 99.5))
        smooth = ndimage.gaussian_filter(data, 2)
        head = ndimage.binary_closing(smooth > 0.1 * bright, iterations=3)
        head = ndimage.binary_dilation(ndimage.binary_fill_holes(head), iterations=2)
        return np.where(head, data, rng.uniform(0, bright, data.shape)).astype(np.float32)
    if kind == 'bias':
        x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in data.shape], indexing='ij')
        field = 1 + 0.65 * np.tanh(0.9 * x + 0.6 * z - 0.4 * y**2)
        return (data * field).astype(np.float32)
    raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out', help='the mirror folder to write (replaced)')
    parser.add_argument('--kind', choices=KINDS, required=True)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    import nibabel as nb

    rng = np.random.default_rng(args.seed)
    mirror = C.start_mirror(args.out)
    for subject in sorted(p for p in (C.DATA / 'bids').glob('sub-*') if p.is_dir()):
        src, dst = subject / 'anat', mirror / subject.name / 'anat'
        dst.mkdir(parents=True)
        for image in sorted(src.iterdir()):
            if not image.name.endswith('_T1w.nii.gz'):
                os.symlink(image, dst / image.name)
                continue
            nii = nb.load(str(image))
            data = with_artefact(nii.get_fdata(dtype=np.float32), args.kind, rng)
            nb.save(nb.Nifti1Image(data, nii.affine), str(dst / image.name))
            print(f'{image.name}: {args.kind}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
