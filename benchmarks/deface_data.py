"""A defaced mirror of the shared data, to run the benchmarks on defaced scans.

Open datasets (OpenNeuro and the like) share anatomical scans defaced: the face in front of and
below the brain is set to zero. This writes a copy of ``bids/`` with each image defaced as
pydeface does it: a face mask drawn on ``tpl-MNI152NLin6Asym_res-02_T1w`` (in front of
y = 20 mm below z = -30 mm, and in front of y = 55 mm below z = 0, never within 8 mm of the
template's brain mask) is carried onto each subject's T1w by an antspyx ``Affine`` of the
template, and onto its other images through the T1w by world coordinates. The rest of the
shared data (templates, derivatives with the label maps) is linked. Point
``SYNTHMORPH_SHARED_DATA`` at the output to run a benchmark on it::

    python benchmarks/deface_data.py /tmp/deface/data
    SYNTHMORPH_SHARED_DATA=/tmp/deface/data python benchmarks/mni_head_bench.py --settings ...

A script, not a test; see ``benchmarks/README.md`` ("Session 24: defaced scans").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

TEMPLATE = C.DATA / 'templateflow' / 'tpl-MNI152NLin6Asym'


def face_mask(path: Path) -> None:
    """The face mask on the res-02 head template, written to ``path``."""
    import nibabel as nb
    from scipy import ndimage

    head = nb.load(str(TEMPLATE / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz'))
    brain = nb.load(str(TEMPLATE / 'tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz'))
    ras = np.indices(head.shape).reshape(3, -1).T @ head.affine[:3, :3].T + head.affine[:3, 3]
    vox = np.rint((ras - brain.affine[:3, 3]) @ np.linalg.inv(brain.affine[:3, :3]).T)
    vox = vox.astype(int)
    inside = np.all((vox >= 0) & (vox < brain.shape), axis=1)
    keep = np.zeros(len(ras), bool)
    keep[inside] = (np.asarray(brain.dataobj) > 0)[tuple(vox[inside].T)]
    keep = ndimage.binary_dilation(keep.reshape(head.shape), iterations=4)  # 8 mm at 2 mm
    y, z = (ras[:, k].reshape(head.shape) for k in (1, 2))
    face = (((y > 20) & (z < -30)) | ((y > 55) & (z < 0))) & ~keep
    nb.save(nb.Nifti1Image(face.astype(np.uint8), head.affine), str(path))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out', help='the mirror folder to write (replaced)')
    args = parser.parse_args(argv)
    import ants
    import nibabel as nb

    out = Path(args.out)
    mirror = C.start_mirror(out)
    face_mask(out / 'face_mask.nii.gz')
    template = ants.image_read(str(TEMPLATE / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz'))
    mask = ants.image_read(str(out / 'face_mask.nii.gz'))
    for subject in sorted(p for p in (C.DATA / 'bids').glob('sub-*') if p.is_dir()):
        src, dst = subject / 'anat', mirror / subject.name / 'anat'
        dst.mkdir(parents=True)
        t1w = ants.image_read(str(src / f'{subject.name}_T1w.nii.gz'))
        fit = ants.registration(fixed=t1w, moving=template, type_of_transform='Affine')
        on_t1w = ants.apply_transforms(fixed=t1w, moving=mask, interpolator='nearestNeighbor',
                                       transformlist=fit['fwdtransforms'])
        for image in sorted(src.glob('*.nii.gz')):
            target = ants.image_read(str(image))
            face = ants.resample_image_to_target(on_t1w, target, interp_type='nearestNeighbor')
            nii = nb.load(str(image))
            data = np.asanyarray(nii.dataobj).copy()
            cut = face.numpy() > 0
            data[cut] = 0
            nb.save(nb.Nifti1Image(data, nii.affine, nii.header), str(dst / image.name))
            print(f'{image.name}: {100 * cut.mean():.1f} % of the voxels set to 0', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
