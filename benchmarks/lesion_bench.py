"""A lesion in the moving image: how far does it move the registration of the healthy brain,
with and without a lesion mask (cost-function masking)?

For each subject of the shared BIDS dataset (whole-head T1w, 2 mm), a chronic stroke-like
lesion is drawn into a copy of its T1w: a blob of radius ``--radius`` mm (its edge roughened by
smooth noise, 25 %) in one hemisphere's upper lateral brain (40 mm lateral of the brain's centre
of mass and 20 mm above it; left and right alternate by subject), cut to the brain (DLMUSE
labels), and filled with the intensity of the subject's own lateral ventricles (a fluid-filled
cavity) with a soft 1-voxel edge. Nothing else changes (no mass effect), so the registration of
the lesion-free copy (written the same way, float32) is the truth for everything outside the
lesion.

Each method registers the clean copy and the lesioned one to MNI152NLin6Asym (``res-02``,
whole head), and the lesioned one again with the lesion mask: ours ``register`` with the
BIDS-App's T1w options (``--cross-contrast no -x <template brain mask>``) and
``--moving-lesion-mask``; ANTs SyN (antspyx, its defaults) with ``moving_mask`` = outside the
lesion for every stage; greedy (NCC 2x2x2, affine then deformable) with ``-mm``. The gap
``|T_lesion(x) - T_clean(x)|`` (mm, in the subject's space) is measured over the template's brain
(``res-01_desc-brain_mask``, every 5th voxel), split by where the clean transform puts each
point: in the lesion, within 15 mm of it (``near``), farther (``far``).

Run from the repository root::

    python benchmarks/lesion_bench.py --json benchmarks/results/lesion_bench.json

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
MASK = TEMPLATE / 'tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz'
METHODS = ('ours', 'ants', 'greedy')
#: DLMUSE labels of the lateral ventricles (right, left): the fluid the lesion is filled with.
VENTRICLES = (51, 52)
NEAR_MM = 15.0


def _site(image, labels: np.ndarray, side: int):
    """World coordinates of every voxel (N, 3) and the lesion's centre: the brain voxel nearest
    to 40 mm lateral of the brain's centre of mass (``side`` +1 right, -1 left) and 20 mm above."""
    ijk = np.indices(labels.shape).reshape(3, -1).T
    world = ijk @ image.affine[:3, :3].T + image.affine[:3, 3]
    inside = labels.reshape(-1) > 0
    target = world[inside].mean(axis=0) + np.array([40.0 * side, 0.0, 20.0])
    return world, world[inside][np.argmin(np.linalg.norm(world[inside] - target, axis=1))]


def make_lesion(image, labels: np.ndarray, radius: float, side: int, seed: int):
    """(lesioned float32 array, lesion mask uint8, to_lesioned) of ``image`` (nibabel, labels
    on its grid): a fluid-filled cavity; ``to_lesioned`` maps points of the clean image to the
    lesioned one (here the identity: nothing moves) and flags those the lesion destroyed."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    data = image.get_fdata(dtype=np.float32)
    brain = labels > 0
    vox = np.asarray(image.header.get_zooms()[:3], dtype=float)
    world, seed_point = _site(image, labels, side)
    dist = np.linalg.norm(world - seed_point, axis=1).reshape(data.shape)
    noise = ndimage.gaussian_filter(rng.standard_normal(data.shape), sigma=6.0 / vox)
    noise /= noise.std()
    lesion = (dist < radius * (1 + 0.25 * noise)) & brain
    fluid = float(np.median(data[np.isin(labels, VENTRICLES)]))
    soft = np.clip(ndimage.gaussian_filter(lesion.astype(np.float32), 0.7), 0, 1)
    soft[lesion] = 1.0
    filled = fluid * (1 + 0.05 * rng.standard_normal(data.shape)).astype(np.float32)

    def to_lesioned(points):
        return points, np.zeros(len(points), bool)

    return ((data * (1 - soft) + filled * soft).astype(np.float32), lesion.astype(np.uint8),
            to_lesioned)


#: The tumour's mass effect: the brain at its edge is pushed out by PUSH times its radius, less
#: so farther away (exp(-distance / PUSH_DECAY_MM)).
PUSH = 0.4
PUSH_DECAY_MM = 10.0


def make_tumour(image, labels: np.ndarray, radius: float, side: int, seed: int):
    """A tumour with mass effect: a sphere of ``radius`` mm whose contents replace the tissue
    that lay within ``(1 - PUSH) radius`` and push the brain around it outwards (radially,
    ``PUSH radius exp(-(r - radius) / PUSH_DECAY_MM)`` at a distance ``r`` from its centre), of a
    dark, mottled intensity between fluid and tissue. Returns the lesioned float32 array, the
    tumour mask (uint8) and ``to_lesioned``: clean points -> where they are in the lesioned
    image (the inverse of the push), with a flag for those the tumour replaced."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    data = image.get_fdata(dtype=np.float32)
    vox = np.asarray(image.header.get_zooms()[:3], dtype=float)
    world, centre = _site(image, labels, side)
    offset = world - centre
    r = np.linalg.norm(offset, axis=1)

    def clean_radius(rad):  # lesioned radius -> clean radius
        rad = np.asarray(rad, dtype=float)
        out = rad - PUSH * radius * np.exp(-np.maximum(rad - radius, 0) / PUSH_DECAY_MM)
        return np.where(rad < radius, rad * (1 - PUSH), out)

    scale = clean_radius(r) / np.maximum(r, 1e-6)
    source = centre + offset * scale[:, None]  # where each lesioned voxel's tissue came from
    src_ijk = (source - image.affine[:3, 3]) @ np.linalg.inv(image.affine[:3, :3]).T
    pushed = ndimage.map_coordinates(data, src_ijk.T, order=1, mode='constant')
    pushed_labels = ndimage.map_coordinates(labels, src_ijk.T, order=0, mode='constant')
    tumour = ((r < radius) & (pushed_labels > 0)).reshape(data.shape)
    out = pushed.reshape(data.shape).astype(np.float32)
    fluid = float(np.median(data[np.isin(labels, VENTRICLES)]))
    tissue = float(np.median(data[labels > 0]))
    mottle = ndimage.gaussian_filter(rng.standard_normal(data.shape), sigma=3.0 / vox)
    mottle /= mottle.std()
    level = (fluid + 0.5 * (tissue - fluid)) * (1 + 0.15 * mottle)
    soft = np.clip(ndimage.gaussian_filter(tumour.astype(np.float32), 0.7), 0, 1)
    soft[tumour] = 1.0
    out = out * (1 - soft) + level.astype(np.float32) * soft
    table_r = np.linspace(radius, radius + 400.0, 40001)
    table_rho = clean_radius(table_r)  # increasing beyond the tumour's edge

    def to_lesioned(points):
        off = np.asarray(points, dtype=float) - centre
        rho = np.linalg.norm(off, axis=1)
        replaced = rho < (1 - PUSH) * radius
        rad = np.interp(rho, table_rho, table_r)
        return centre + off * (rad / np.maximum(rho, 1e-6))[:, None], replaced

    return out.astype(np.float32), tumour.astype(np.uint8), to_lesioned


def save(data, like, path) -> str:
    import nibabel as nb

    out = nb.Nifti1Image(data, like.affine)
    out.set_qform(like.affine, code=1)
    out.set_sform(like.affine, code=1)
    nb.save(out, path)
    return str(path)


def run(method: str, moving: str, fixed: str, threads: int, lesion: str | None) -> dict:
    if method == 'ours':
        options = ['--cross-contrast', 'no', '-x', str(MASK)]
        if lesion:
            options += ['--moving-lesion-mask', lesion]
        return C.in_child(C.run_register, moving, fixed, 'joint', threads, options)
    keep = None
    if lesion:  # the others take a mask of where the metric counts
        import nibabel as nb

        img = nb.load(lesion)
        keep = save((np.asarray(img.dataobj) == 0).astype(np.uint8), img,
                    Path(lesion).with_name('keep.nii.gz'))
    if method == 'ants':
        return C.in_child(C.run_ants, moving, fixed, 'SyN', threads, moving_mask=keep)
    if method == 'greedy':
        return C.in_child(C.run_greedy, moving, fixed, threads=threads, moving_mask=keep)
    raise ValueError(f'unknown method {method!r}')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--subjects', nargs='+', default=[f'{i:02d}' for i in range(1, 13)])
    p.add_argument('--radius', type=float, nargs='+', default=[20.0],
                   help='lesion radius (mm); several: one per subject in turn (20)')
    p.add_argument('--kind', choices=('cavity', 'tumour'), default='cavity',
                   help='a fluid-filled cavity where tissue was (cavity, default) or a tumour '
                        'that pushes the brain aside (tumour)')
    p.add_argument('--methods', nargs='+', choices=METHODS, default=list(METHODS))
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--json', help='write every figure here')
    args = p.parse_args(argv)
    C.pin_threads(args.threads)
    import nibabel as nb
    from scipy import ndimage

    from synthmorph_app.io.images import Geometry

    fixed = str(TEMPLATE / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz')
    mask = nb.load(MASK)
    points = nb.affines.apply_affine(mask.affine, np.argwhere(mask.get_fdata() > 0)[::5])
    fixed_grid = Geometry.from_image(nb.load(fixed))
    rows = []
    for n, subject in enumerate(args.subjects):
        radius = args.radius[n % len(args.radius)]
        side = 1 if n % 2 == 0 else -1
        image = nb.load(C.DATA / 'bids' / f'sub-{subject}' / 'anat' / f'sub-{subject}_T1w.nii.gz')
        labels = np.asarray(nb.load(C.dlmuse_labels(subject)).dataobj)
        make = make_tumour if args.kind == 'tumour' else make_lesion
        lesioned, lesion, to_lesioned = make(image, labels, radius, side, seed=n)
        vox = np.asarray(image.header.get_zooms()[:3], dtype=float)
        distance = ndimage.distance_transform_edt(lesion == 0, sampling=vox)
        to_vox = np.linalg.inv(image.affine)
        volume_ml = float(lesion.sum() * np.prod(vox) / 1000)
        with tempfile.TemporaryDirectory() as tmp:
            clean = save(image.get_fdata(dtype=np.float32), image, f'{tmp}/clean.nii.gz')
            sick = save(lesioned, image, f'{tmp}/lesion.nii.gz')
            lesion_file = save(lesion, image, f'{tmp}/lesion_mask.nii.gz')
            grid = Geometry.from_image(image)
            for method in args.methods:
                mapped = {}
                for name, path, mask_file in (('clean', clean, None), ('lesion', sick, None),
                                              ('lesion+mask', sick, lesion_file)):
                    result = run(method, path, fixed, args.threads, mask_file)
                    mapped[name] = C.as_transform(result, fixed_grid, grid).map_points(points)
                    if name == 'clean':  # the truth: where that tissue is in the lesioned image
                        truth, replaced = to_lesioned(mapped[name])
                        ijk = np.rint(nb.affines.apply_affine(to_vox, truth)).astype(int)
                        ijk = np.clip(ijk, 0, np.array(lesion.shape) - 1)
                        d = distance[tuple(ijk.T)]
                        d[replaced] = 0
                        where = {'in': d == 0, 'near': (d > 0) & (d <= NEAR_MM),
                                 'far': d > NEAR_MM}
                        continue
                    gap = np.linalg.norm(mapped[name] - truth, axis=1)
                    row = {'subject': subject, 'radius': radius, 'volume_ml': volume_ml,
                           'method': method, 'run': name, 'time': result['time']}
                    for part, sel in where.items():
                        row[f'{part}_mean'] = float(gap[sel].mean()) if sel.any() else None
                    near = gap[where['near']]
                    row.update(near_p95=float(np.percentile(near, 95)),
                               near_max=float(near.max()),
                               near_over_2mm=float(100 * (near > 2).mean()))
                    rows.append(row)
                    print(f"sub-{subject} r{radius:g} ({volume_ml:.0f} ml) {method:6s} "
                          f"{name:12s} in {row['in_mean']:.2f} near {row['near_mean']:.2f} "
                          f"(p95 {row['near_p95']:.2f}, max {row['near_max']:.1f}, "
                          f"{row['near_over_2mm']:.1f} % > 2 mm) far {row['far_mean']:.2f} mm "
                          f"({row['time']:.0f} s)", flush=True)
    print('\n| method | run | in lesion | near (15 mm) | near p95 | near % > 2 mm | far |')
    print('|---|---|---|---|---|---|---|')
    for method in args.methods:
        for name in ('lesion', 'lesion+mask'):
            sel = [r for r in rows if r['method'] == method and r['run'] == name]
            if not sel:
                continue
            mean = {k: np.mean([r[k] for r in sel]) for k in
                    ('in_mean', 'near_mean', 'near_p95', 'near_over_2mm', 'far_mean')}
            print(f"| {method} | {name} | {mean['in_mean']:.2f} | {mean['near_mean']:.2f} | "
                  f"{mean['near_p95']:.2f} | {mean['near_over_2mm']:.1f} | "
                  f"{mean['far_mean']:.2f} |")
    if args.json:
        C.write_results(args.json, 'lesion_bench', argv, rows, near_mm=NEAR_MM, kind=args.kind,
                        **({'push': PUSH, 'push_decay_mm': PUSH_DECAY_MM}
                           if args.kind == 'tumour' else {}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
