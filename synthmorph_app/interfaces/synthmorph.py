"""Nipype interfaces over the registration API (:mod:`synthmorph_app.engine.register`).

Thin wrappers: each ``_run_interface`` names its outputs in ``runtime.cwd`` and calls one plain
function of this module, which works without Nipype. torch is imported only when a node runs,
so building a workflow stays fast.

>>> from synthmorph_app.interfaces.synthmorph import SynthMorphRegister
>>> reg = SynthMorphRegister(mode='affine', lam=0.3)
>>> reg.inputs.mode, reg.inputs.lam, reg.inputs.device
('affine', 0.3, 'cpu')
>>> sorted(reg.output_spec().get())
['forward_xfm', 'inverse_xfm', 'log_jacobian', 'metadata', 'moved_image', 'moved_lesion']

>>> from synthmorph_app.interfaces.synthmorph import SynthMorphApply
>>> SynthMorphApply(interpolation='nearest').inputs.interpolation
'nearest'
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..engine import DEFAULT_REFINE


class _SynthMorphRegisterInputSpec(BaseInterfaceInputSpec):
    moving_image = File(exists=True, mandatory=True, desc='image to move (any MRI contrast)')
    fixed_image = File(exists=True, mandatory=True, desc='fixed image (e.g. a template)')
    mode = traits.Enum('joint', 'affine', 'rigid', 'deform', usedefault=True,
                       desc='transformation model: joint = affine then deformable')
    lam = traits.Range(low=0.0, high=1.0, value=0.5, usedefault=True,
                       desc='regularisation weight lambda in [0, 1] (0 sharpest, 1 smoothest)')
    steps = traits.Int(7, usedefault=True, desc='integration steps of the velocity field')
    extent = traits.Float(256.0, usedefault=True, desc='side of the network space in mm')
    passes = traits.Range(low=1, value=1, usedefault=True,
                          desc='runs of the deformable network, each on the image the runs '
                               'before moved (joint and deform modes)')
    refine = traits.Int(DEFAULT_REFINE, usedefault=True,
                        desc='test-time optimisation iterations (0: the networks only)')
    refine_options = traits.Dict(traits.Str, traits.Any, desc='more refinement settings: '
                                 'init_method, refine_metric, refine_levels, refine_weight, '
                                 'cross_contrast '
                                 '(keywords of engine.register.register)')
    reference_image = File(exists=True, desc='grid of moved_image, moved_lesion and '
                           'log_jacobian (default: the fixed image\'s): another resolution of '
                           'the same template, so that one registration serves several')
    fixed_mask = File(exists=True, desc='brain mask of the fixed image (e.g. the template\'s '
                      'desc-brain_mask): weights the refinement in place of refine_weight')
    moving_mask = File(exists=True, desc='brain mask of the moving image (weights the affine '
                       'refinement)')
    lesion_mask = File(exists=True, desc='lesion mask (non-zero in a stroke, a resection '
                       'cavity, a tumour) of the image registered to the fixed one: the moving '
                       'image, or via_image when given (sMRIPrep\'s lesion_mask, in T1w space): '
                       'filled from the tissue around it and left out of the similarity')
    via_image = File(exists=True, desc='another image of the same person in the contrast of '
                     'the fixed image (the T1w of a FLAIR\'s session): the moving image is '
                     'aligned to it rigidly and it is registered to the fixed image; the '
                     'transforms are the two composed')
    cache_dir = traits.Str(desc='folder where registrations are kept and reused by later '
                           'jobs (the registration of via_image when given, else of the moving '
                           'image; see engine.cache)')
    weights = traits.Dict(traits.Str, traits.Str, desc='model weights by kind '
                          '({"affine": path, "deform": path}); default: packaged models')
    device = traits.Enum('cpu', 'cuda', 'auto', usedefault=True, desc='torch device')
    use_gpu = traits.Bool(False, usedefault=True,
                          desc='tells MultiProc this node holds a GPU (set with device=cuda)')
    num_threads = traits.Int(1, usedefault=True, desc='CPU threads torch may use')
    moved_image_name = traits.Str('moved.nii.gz', usedefault=True,
                                  desc='file name of the moved image')


class _SynthMorphRegisterOutputSpec(TraitedSpec):
    forward_xfm = File(exists=True, desc='ITK composite .h5: moves MOVING onto FIXED '
                       '(fixed -> moving points, e.g. from-T1w_to-<tpl>)')
    inverse_xfm = File(exists=True, desc='ITK composite .h5: moves FIXED onto MOVING')
    moved_image = File(exists=True, desc='moving image resampled on the fixed grid (or '
                       'reference_image\'s)')
    moved_lesion = File(exists=True, desc='lesion_mask resampled on the fixed grid (or '
                        'reference_image\'s; uint8, 1 in the lesion), where a lesion mask was '
                        'given')
    log_jacobian = File(desc='Jacobian determinant of the forward map on the fixed grid (or '
                        'reference_image\'s; deformable modes only)')
    metadata = traits.Dict(desc='mode, lambda, device, model cards (name, sha256), timings')


class SynthMorphRegister(SimpleInterface):
    """Register ``moving_image`` to ``fixed_image`` with SynthMorph networks.

    Outputs follow fMRIPrep: ``forward_xfm`` is what sMRIPrep calls ``anat2std_xfm`` when the
    fixed image is a template.
    """

    input_spec = _SynthMorphRegisterInputSpec
    output_spec = _SynthMorphRegisterOutputSpec

    def _run_interface(self, runtime):
        cwd = Path(runtime.cwd)
        weights = dict(self.inputs.weights) if isdefined(self.inputs.weights) else None
        self._results.update(
            register_files(
                self.inputs.moving_image,
                self.inputs.fixed_image,
                forward_xfm=cwd / 'forward_xfm.h5',
                inverse_xfm=cwd / 'inverse_xfm.h5',
                moved_image=cwd / self.inputs.moved_image_name,
                moved_lesion=cwd / 'moved_lesion.nii.gz',
                jacobian=cwd / 'jacobian.nii.gz',
                reference_image=_defined(self.inputs.reference_image),
                mode=self.inputs.mode,
                lam=self.inputs.lam,
                steps=self.inputs.steps,
                extent=self.inputs.extent,
                passes=self.inputs.passes,
                refine=self.inputs.refine,
                refine_options=_defined(self.inputs.refine_options),
                fixed_mask=_defined(self.inputs.fixed_mask),
                moving_mask=_defined(self.inputs.moving_mask),
                lesion_mask=_defined(self.inputs.lesion_mask),
                via_image=_defined(self.inputs.via_image),
                cache_dir=_defined(self.inputs.cache_dir),
                weights=weights,
                device=self.inputs.device,
                num_threads=self.inputs.num_threads,
            )
        )
        return runtime


def _defined(value):
    return value if isdefined(value) else None


def register_files(
    moving_image: str | os.PathLike,
    fixed_image: str | os.PathLike,
    *,
    forward_xfm: str | os.PathLike,
    inverse_xfm: str | os.PathLike,
    moved_image: str | os.PathLike | None = None,
    moved_lesion: str | os.PathLike | None = None,
    jacobian: str | os.PathLike | None = None,
    reference_image: str | os.PathLike | None = None,
    mode: str = 'joint',
    lam: float = 0.5,
    steps: int = 7,
    extent: float = 256.0,
    passes: int = 1,
    refine: int = DEFAULT_REFINE,
    refine_options: dict | None = None,
    fixed_mask: str | os.PathLike | None = None,
    moving_mask: str | os.PathLike | None = None,
    lesion_mask: str | os.PathLike | None = None,
    via_image: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    weights: dict | None = None,
    device: str = 'cpu',
    num_threads: int | None = None,
) -> dict:
    """Register two image files and write transforms, the moved image and the Jacobian.

    Returns a dict of output paths (``forward_xfm``, ``inverse_xfm``, ``moved_image``,
    ``log_jacobian`` -- the Jacobian determinant, named as the Nipype output) and ``metadata``.
    ``fixed_mask``/``moving_mask``: brain mask files that weight the refinement
    (``engine.register.register``). ``lesion_mask``: a lesion of the image registered to the
    fixed one (the moving image; with ``via_image``, that image), its
    ``moving_lesion_mask``; ``metadata['lesion_mask']`` then names the file, and
    ``moved_lesion`` receives it on the fixed grid (linear, then 1 where at least 0.5: the
    lesion in template space, as lesion-symptom mapping needs it). ``via_image``:
    register through that image of the same person (``engine.register.register_via``);
    ``metadata['via']`` then names it.
    ``reference_image``: the grid of the moved image, the moved lesion and the Jacobian
    (default: the fixed image's).
    ``cache_dir``: keep the registration of the two images (of ``via_image`` and the fixed
    image) there, and read it from there when an earlier job stored it (``engine.cache``).
    Input problems raise :class:`~synthmorph_app.errors.InputImageError` naming the file.
    """
    import torch

    from ..utils.logs import collected_warnings, merged

    if num_threads:
        torch.set_num_threads(int(num_threads))
    with collected_warnings() as warned:
        out = _register_files(
            moving_image, fixed_image, forward_xfm=forward_xfm, inverse_xfm=inverse_xfm,
            moved_image=moved_image, moved_lesion=moved_lesion, jacobian=jacobian,
            reference_image=reference_image, fixed_mask=fixed_mask, moving_mask=moving_mask,
            lesion_mask=lesion_mask, via_image=via_image, cache_dir=cache_dir,
            options=dict(mode=mode, lam=lam, steps=steps, extent=extent, passes=passes,
                         weights=weights, refine=refine, device=device,
                         **(refine_options or {})),
        )
    # what this job logged, and what the run that computed a cached registration logged
    out['metadata']['warnings'] = merged(warned, out['metadata'].get('warnings'))
    out['metadata']['threads'] = torch.get_num_threads()
    return out


def _register_files(moving_image, fixed_image, *, forward_xfm, inverse_xfm, moved_image,
                    moved_lesion, jacobian, reference_image, fixed_mask, moving_mask,
                    lesion_mask, via_image, cache_dir, options) -> dict:
    """:func:`register_files`' work, its options gathered (``options``: the engine's)."""
    import nibabel as nb
    import numpy as np

    from ..engine.register import moved_image as resample
    from ..engine.register import register, register_via
    from ..evaluate import jacobian_determinant
    from ..io.images import Geometry, load_image, load_masks, save_image
    from ..io.transforms import save_transform
    from ..utils.logs import collected_warnings

    device = options['device']
    start = time.perf_counter()
    moving = load_image(moving_image, kind='moving image')
    fixed = load_image(fixed_image, kind='fixed image')
    masks = load_masks(fixed_mask, moving_mask)
    lesion = load_masks(moving_lesion=lesion_mask)

    def registration(source, source_file, source_mask):
        """``source`` to the fixed image, through the cache when there is one."""
        kept = {k: v for k, v in masks.items() if k == 'fixed_mask' or source_mask}

        def compute():
            with collected_warnings() as warned:  # stored with a cached result
                result = register(source, fixed, **options, **kept, **lesion)
            result.info['warnings'] = warned
            return result

        if not cache_dir:
            return compute()
        from ..engine.cache import cached_registration, registration_key

        key = registration_key(source_file, fixed_image, options,
                               {'fixed_mask': fixed_mask,
                                'moving_mask': moving_mask if source_mask else None,
                                **({'lesion_mask': lesion_mask} if lesion_mask else {})})
        return cached_registration(cache_dir, key, compute,
                                   reference=Geometry.from_image(fixed),
                                   moving=Geometry.from_image(source))

    if via_image:
        via = load_image(via_image, kind='via image (the T1w of the same session; the '
                                          "BIDS-App's --no-via-t1w registers without it)")
        # the lesion belongs to the via image: it follows that image's registration
        second = registration(via, via_image, source_mask=False)
        result = register_via(moving, via, fixed, second=second, **options, **masks)
        result.info['via']['image'] = str(via_image)
        lesion_xfm = second.forward
    else:
        result = registration(moving, moving_image, source_mask=True)
        lesion_xfm = result.forward
    out = {
        'forward_xfm': str(save_transform(result.forward, forward_xfm)),
        'inverse_xfm': str(save_transform(result.inverse, inverse_xfm)),
    }
    grid = Geometry.from_image(
        load_image(reference_image, kind='reference image') if reference_image else fixed)
    if moved_image:
        img = resample(moving, result.forward, grid, dtype=np.float32, device=device)
        out['moved_image'] = str(save_image(img, moved_image))
    if moved_lesion and lesion:
        moved = resample(_lesion_share(lesion['moving_lesion_mask']), lesion_xfm, grid,
                         dtype=np.float32, device=device)
        inside = (np.asarray(moved.dataobj) >= 0.5).astype(np.uint8)
        out['moved_lesion'] = str(save_image(nb.Nifti1Image(inside, moved.affine),
                                             moved_lesion))
    if jacobian and result.forward.field is not None:
        geom = grid  # the field sampled on the output grid
        ijk = np.indices(geom.shape).reshape(3, -1).T
        points = ijk @ geom.affine[:3, :3].T + geom.affine[:3, 3]
        field = result.forward.displacement_at(points).reshape(*geom.shape, 3)
        det = jacobian_determinant(field, geom.affine, result.forward.affine)
        out['log_jacobian'] = str(save_image(nb.Nifti1Image(det, geom.affine), jacobian))
    timings = dict(result.timings)
    timings['total'] = time.perf_counter() - start
    if lesion_mask:
        result.info['lesion_mask'] = str(lesion_mask)
    result.info['fixed_image'] = str(fixed_image)
    out['metadata'] = {**result.info, 'timings': {k: round(v, 3) for k, v in timings.items()}}
    return out


def _lesion_share(image):
    """A lesion mask as the engine reads it (:func:`~synthmorph_app.engine.masks.mask_values`),
    on its own grid."""
    import nibabel as nb

    from ..engine.masks import mask_values

    return nb.Nifti1Image(mask_values(image), image.affine)


class _SynthMorphApplyInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc='image on the moving side of transform')
    transform = File(exists=True, mandatory=True,
                     desc='transform file (.h5/.txt/.lta/field), fixed -> moving points')
    reference_image = File(exists=True, desc='output grid (default: the transform\'s own)')
    invert_transform = traits.Bool(
        False, usedefault=True, desc='use the inverse of transform (linear only), as '
        'antsApplyTransforms -t [transform,1]')
    before_transforms = InputMultiObject(
        File(exists=True), desc='transforms in_file goes through before transform, its own '
        "first (e.g. fMRIPrep's from-boldref_to-T1w before a T1w -> template transform): one "
        'resampling for the whole chain')
    interpolation = traits.Enum('linear', 'nearest', 'labels', usedefault=True,
                                desc='interpolation (labels: per-label linear)')
    fill = traits.Float(0.0, usedefault=True, desc='value outside the input')
    device = traits.Enum('cpu', 'cuda', 'auto', usedefault=True, desc='torch device')
    use_gpu = traits.Bool(False, usedefault=True, desc='tells MultiProc this node uses a GPU')
    out_name = traits.Str('resampled.nii.gz', usedefault=True, desc='output file name')


class _SynthMorphApplyOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='the resampled image')


class SynthMorphApply(SimpleInterface):
    """Resample an image through a transform written by :class:`SynthMorphRegister`."""

    input_spec = _SynthMorphApplyInputSpec
    output_spec = _SynthMorphApplyOutputSpec

    def _run_interface(self, runtime):
        reference = (self.inputs.reference_image
                     if isdefined(self.inputs.reference_image) else None)
        before = self.inputs.before_transforms if isdefined(self.inputs.before_transforms) \
            else ()
        self._results['out_file'] = str(apply_file(
            self.inputs.in_file, self.inputs.transform, Path(runtime.cwd) / self.inputs.out_name,
            reference=reference, interpolation=self.inputs.interpolation,
            fill=self.inputs.fill, device=self.inputs.device, before=before,
            invert=self.inputs.invert_transform,
        ))
        return runtime


def apply_file(in_file, transform, out_file, *, reference=None, interpolation='linear',
               fill=0.0, device='cpu', before=(), invert=False) -> Path:
    """Resample ``in_file`` through the ``transform`` file and write ``out_file``;
    ``before``: transform files ``in_file`` goes through first, its own first (paths, or
    ``(path, invert)``); ``invert``: use the inverse of ``transform`` (linear only)."""
    from ..engine.register import moved_image
    from ..io.images import Geometry, load_image, save_image
    from ..io.transforms import load_chain

    ref = Geometry.from_image(load_image(reference, kind='reference image', frames=True)) \
        if reference else None
    img = load_image(in_file, kind='input image', frames=True)
    xfm = load_chain(transform, before=before, invert=invert, reference=ref,
                     moving=Geometry.from_image(img))
    return save_image(moved_image(img, xfm, ref, mode=interpolation, fill=fill, device=device),
                      out_file)
