"""Report figures of one registration: a before/after flicker SVG and a Jacobian map.

The flicker figure is niworkflows' (``plot_registration`` + ``compose_view``, as its
``RegistrationRC`` reportlets draw): the image placed on the template grid by its header alone
("before") and after registration, both under the outline of the template's brain mask.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _on_grid(img, reference, order=1):
    from nibabel.processing import resample_from_to

    return resample_from_to(img, (reference.shape[:3], reference.affine), order=order)


def image_qc(
    moving_image: str | os.PathLike,
    moved_image: str | os.PathLike,
    template: str | os.PathLike,
    template_mask: str | os.PathLike,
    jacobian: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    figures: bool = True,
    lesion_mask: str | os.PathLike | None = None,
) -> dict:
    """QC figures (``before_after``, ``jacobian_figure`` SVG paths) and metrics (``qc``).

    ``lesion_mask`` (the lesion on the template grid, or any grid in its world space) is left
    out of the metrics: a lesion matches nothing in the template by nature, and would make a
    good registration of a patient look like an outlier in the group report.
    """
    import nibabel as nb

    from ..io.images import load_image
    from .metrics import registration_qc

    out_dir = Path(out_dir)
    tpl = nb.load(str(template))
    moved = nb.load(str(moved_image))
    mask = _on_grid(nb.load(str(template_mask)), tpl, order=0)
    mask_data = np.asanyarray(mask.dataobj) > 0
    if lesion_mask:
        lesion = _on_grid(nb.load(str(lesion_mask)), tpl, order=0)
        mask_data = mask_data & ~(np.asanyarray(lesion.dataobj) > 0)
    jac = nb.load(str(jacobian)) if jacobian else None
    jac_data = None
    if jac is not None:
        if jac.shape[:3] != tpl.shape[:3] or not np.allclose(jac.affine, tpl.affine, atol=1e-4):
            jac = _on_grid(jac, tpl)
        jac_data = np.asanyarray(jac.dataobj)
    qc = registration_qc(np.asanyarray(moved.dataobj), np.asanyarray(tpl.dataobj), mask_data,
                         jac_data)
    out = {'qc': qc}
    if figures:
        # read as the registration read it (a (X, Y, Z, 1) file is 3D)
        before = _on_grid(load_image(moving_image, kind='moving image'), tpl)
        before_nii = nb.Nifti1Image(np.asanyarray(before.dataobj, dtype=np.float32), tpl.affine)
        mask_nii = nb.Nifti1Image(mask_data.astype(np.uint8), tpl.affine)
        out['before_after'] = str(before_after_svg(before_nii, moved, mask_nii,
                                                   out_dir / 'before_after.svg'))
        if jac is not None:
            out['jacobian_figure'] = str(jacobian_svg(jac, tpl, mask_nii,
                                                      out_dir / 'jacobian.svg'))
    return out


def before_after_svg(before, after, contour, out_file) -> Path:
    """niworkflows' flicker SVG: ``before`` then ``after`` under ``contour``'s outline."""
    import matplotlib

    matplotlib.use('Agg')
    from niworkflows.viz.utils import compose_view, cuts_from_bbox, plot_registration

    cuts = cuts_from_bbox(contour, cuts=7)
    compose_view(
        plot_registration(before, 'before', estimate_brightness=True, cuts=cuts,
                          contour=contour, label='before: image header only',
                          compress=False),
        plot_registration(after, 'after', estimate_brightness=True, cuts=cuts,
                          contour=contour, label='after: SynthMorph', compress=False),
        out_file=str(out_file),
    )
    return Path(out_file)


def jacobian_svg(jacobian, template, mask, out_file) -> Path:
    """log Jacobian determinant (blue shrink, red growth) over the template, 3 views."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    det = np.asanyarray(jacobian.dataobj, dtype=np.float64)
    logj = np.log(np.clip(det, 1e-3, None))
    bg = np.asanyarray(template.dataobj, dtype=np.float64)
    inside = np.asanyarray(mask.dataobj) > 0
    centre = [int(np.round(np.mean(ax))) for ax in np.nonzero(inside)] if inside.any() else \
        [s // 2 for s in bg.shape]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), facecolor='black')
    vmax = float(np.percentile(np.abs(logj[inside]), 99)) if inside.any() else 1.0
    vmax = max(vmax, 0.05)
    im = None
    for ax, axis in zip(axes, range(3)):
        sl = [slice(None)] * 3
        sl[axis] = centre[axis]
        sl = tuple(sl)
        ax.imshow(np.rot90(bg[sl]), cmap='gray')
        overlay = np.ma.masked_where(~inside[sl], logj[sl])
        im = ax.imshow(np.rot90(overlay), cmap='RdBu_r', vmin=-vmax, vmax=vmax, alpha=0.8)
        ax.axis('off')
    cbar = fig.colorbar(im, ax=axes, fraction=0.02)
    cbar.set_label('log det J', color='white')
    cbar.ax.tick_params(colors='white')
    fig.savefig(out_file, format='svg', facecolor='black')
    plt.close(fig)
    return Path(out_file)
