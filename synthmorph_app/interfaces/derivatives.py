"""Write one image's derivatives for one template, atomically, with BIDS sidecars.

Everything is copied to hidden temporary names first and then renamed into place; the forward
transform's JSON sidecar is renamed last and marks the set as complete (:func:`is_complete`),
so an interrupted run never leaves a set that looks finished, and a rerun redoes it. Where a
set is written again, its old forward sidecar goes first and the files of the old set that
the new one does not have (an LTA of the other mode, a lesion or a figure no longer made) are
removed, so the folder holds one registration's files.

The sidecars record the settings that decided the registration (``RegistrationSettings``,
:meth:`~synthmorph_app.workflows.settings.RegistrationSettings.signature`); a set made with
other settings is not complete for a run that asks for new ones (:func:`settings_changes`).

With ``output_lta``, FreeSurfer LTA copies of both transforms go next to the ``.h5`` files. An
LTA holds one matrix: for the linear modes (affine, rigid) it is the whole transform and shares
the ``.h5``'s name and sidecar; for joint and deform it is only the affine of the composite
``[affine, field]``, named ``*_mode-image_desc-linear_xfm.lta`` with its own sidecar saying so.

>>> from synthmorph_app.interfaces.derivatives import lta_desc
>>> lta_desc('affine') is None, lta_desc('joint')
(True, 'linear')
>>> settings_changes({'mode': 'joint', 'lambda': 0.5}, {'mode': 'affine', 'lambda': 0.5})
{'mode': ('joint', 'affine')}

>>> from synthmorph_app.interfaces.derivatives import DerivativesSink
>>> sorted(DerivativesSink().output_spec().get())
['done', 'out_files']
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..utils.bids import (
    bids_uri,
    input_records,
    parse_entities,
    space_name,
    write_json_atomic,
    xfm_name,
)

#: Registration modes whose transform is one matrix (an LTA holds all of it).
LINEAR_MODES = ('affine', 'rigid')


def lta_desc(mode: str | None) -> str | None:
    """The ``desc`` entity of the LTA files: None for linear modes, ``'linear'`` otherwise."""
    return None if mode in LINEAR_MODES else 'linear'


def derivative_paths(out_dir, in_file, template: str, spec: dict, *,
                     lta_mode: str | None = None, lesion: bool = False) -> dict:
    """Where the derivatives of ``in_file`` in ``template`` go (keys: kinds of file).

    With ``lta_mode`` (the registration mode) the keys ``forward_lta`` and ``inverse_lta``
    name the LTA files too (see :func:`lta_desc`); with ``lesion``, ``lesion_mask`` the lesion
    on the template grid.
    """
    ent = parse_entities(in_file)
    sub_dir = Path(out_dir) / f'sub-{ent["sub"]}'
    anat = sub_dir / (f'ses-{ent["ses"]}' if ent.get('ses') else '') / 'anat'
    figs = sub_dir / 'figures'
    fig_spec = {k: v for k, v in spec.items() if k == 'cohort'}
    # a cohort is another template (an infant age): named as NiBabies names it, MNIInfant+1
    xfm_space = f'{template}+{spec["cohort"]}' if spec.get('cohort') else template
    paths = {
        'space_image': anat / space_name(ent, template, spec),
        'inverse_xfm': anat / xfm_name(ent, xfm_space, inverse=True),
        'forward_xfm': anat / xfm_name(ent, xfm_space),
        'before_after': figs / space_name(ent, template, fig_spec, desc='reg', ext='.svg'),
        'jacobian_figure': figs / space_name(ent, template, fig_spec, desc='jacobian',
                                             ext='.svg'),
    }
    if lesion:
        paths['lesion_mask'] = anat / space_name(ent, template, spec, label='lesion',
                                                 suffix='mask')
    if lta_mode:
        desc = lta_desc(lta_mode)
        paths['inverse_lta'] = anat / xfm_name(ent, xfm_space, inverse=True, ext='.lta',
                                               desc=desc)
        paths['forward_lta'] = anat / xfm_name(ent, xfm_space, ext='.lta', desc=desc)
    return paths


def sidecar(path: Path) -> Path:
    """The JSON sidecar of a derivative (same name up to the extension)."""
    name = path.name
    for ext in ('.nii.gz', '.nii', '.h5', '.lta'):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + '.json')
    return path.with_suffix('.json')


def is_complete(out_dir, in_file, template: str, spec: dict, *,
                lta_mode: str | None = None, lesion: bool = False,
                settings: dict | None = None) -> bool:
    """True when the derivatives of ``in_file`` in ``template`` were all written.

    With ``lta_mode`` (``--output-lta``), the LTA files must be there too, so a rerun that
    asks for them redoes the images written without them; with ``lesion`` (the image has a
    lesion mask now), the lesion on the template grid, so a mask added later redoes the image;
    with ``settings`` (a registration signature), the sidecar must not record other ones
    (:func:`settings_changes`), so a rerun with another ``--mode`` or ``--lambda`` redoes it.
    """
    paths = derivative_paths(out_dir, in_file, template, spec, lta_mode=lta_mode, lesion=lesion)
    # the transforms are named by the template alone: the image on this resolution's grid
    # tells whether this space was made
    done = all(p.is_file() for p in (sidecar(paths['forward_xfm']), paths['space_image'],
                                     sidecar(paths['space_image'])))
    done = done and all(paths[k].is_file() for k in ('forward_lta', 'inverse_lta', 'lesion_mask')
                        if k in paths)
    return done and not (settings is not None and settings_changes(
        recorded_settings(out_dir, in_file, template, spec), settings))


def recorded_settings(out_dir, in_file, template: str, spec: dict) -> dict | None:
    """The ``RegistrationSettings`` recorded with the derivatives of ``in_file`` in
    ``template`` (None: no such sidecar, or one without them)."""
    return _dict_or_none(forward_sidecar(out_dir, in_file, template, spec)
                         .get('RegistrationSettings'))


def forward_sidecar(out_dir, in_file, template: str, spec: dict) -> dict:
    """The forward transform's sidecar of ``in_file`` in ``template`` ({} where there is none
    or it cannot be read): the record of what made the set."""
    path = sidecar(derivative_paths(out_dir, in_file, template, spec)['forward_xfm'])
    try:
        return _dict_or_none(json.loads(path.read_text())) or {}
    except (OSError, ValueError):
        return {}


def _dict_or_none(value) -> dict | None:
    return value if isinstance(value, dict) else None


def settings_changes(recorded: dict | None, settings: dict) -> dict:
    """``{key: (recorded, asked)}`` for the settings that differ; keys only one side has are
    not compared (a sidecar from before a setting was recorded is not redone for it; one
    whose record is not a JSON object records none)."""
    if not isinstance(recorded, dict):
        return {}
    return {key: (recorded[key], value) for key, value in settings.items()
            if key in recorded and recorded[key] != value}


def write_linear_lta(xfm_file, out_file) -> Path:
    """Write the linear part of the transform file ``xfm_file`` as a FreeSurfer LTA.

    The affine of ``T(x) = A (x + w(x))`` (:class:`~synthmorph_app.io.transforms.Transform`),
    i.e. the whole transform when there is no field, with the fixed (``dst``) and moving
    (``src``) grids that our ``.h5`` files record.
    """
    from ..io.transforms import Transform, load_transform, save_transform

    xfm = load_transform(xfm_file)
    linear = Transform(xfm.affine, reference=xfm.reference, moving=xfm.moving)
    return save_transform(linear, out_file)


def save_derivatives(
    out_dir, bids_dir, in_file, template: str, spec: dict, files: dict, *, metadata: dict,
    qc: dict, template_file=None, template_mask=None, command_line: str = '',
    templateflow_home=None, output_lta: bool = False, registration_settings: dict | None = None,
    input_files: dict | None = None,
) -> list[str]:
    """Copy ``files`` (keys as :func:`derivative_paths`) into ``out_dir`` with sidecars.

    ``Sources`` name the image, the template and, where the refinement weighed by it
    (``metadata['refine']['masks']`` holds ``'fixed'``), ``template_mask``; and a lesion
    mask the registration used (``metadata['lesion_mask']``, also as ``LesionMask``).

    ``output_lta`` adds LTA files made from the ``.h5`` transforms (see the module docstring).
    ``registration_settings`` (a signature) goes into the sidecars as ``RegistrationSettings``,
    ``input_files`` (:func:`~synthmorph_app.utils.bids.input_records`) as ``InputFiles``.
    """
    with tempfile.TemporaryDirectory(prefix='synthmorph-lta-') as scratch:
        if output_lta:
            files = {**files,
                     'forward_lta': write_linear_lta(files['forward_xfm'],
                                                     Path(scratch) / 'forward.lta'),
                     'inverse_lta': write_linear_lta(files['inverse_xfm'],
                                                     Path(scratch) / 'inverse.lta')}
        return _save_derivatives(out_dir, bids_dir, in_file, template, spec, files,
                                 metadata=metadata, qc=qc, template_file=template_file,
                                 template_mask=template_mask, command_line=command_line,
                                 templateflow_home=templateflow_home,
                                 registration_settings=registration_settings,
                                 input_files=input_files)


def _save_derivatives(out_dir, bids_dir, in_file, template, spec, files, *, metadata, qc,
                      template_file, template_mask, command_line,
                      templateflow_home, registration_settings, input_files) -> list[str]:
    from .. import __version__

    mode = metadata.get('mode')
    output_lta = 'forward_lta' in files
    dest = derivative_paths(out_dir, in_file, template, spec,
                            lta_mode=(mode or 'joint') if output_lta else None,
                            lesion=bool(files.get('lesion_mask')))
    sources = [bids_uri(in_file, bids_dir)]
    home = templateflow_home or os.environ.get('TEMPLATEFLOW_HOME')
    masked = 'fixed' in metadata.get('refine', {}).get('masks', [])
    def template_uri(path):
        return (bids_uri(path, home, 'templateflow') if home else None) or str(path)

    for path in (template_file, template_mask if masked else None):
        if path:
            sources.append(template_uri(path))
    lesion = metadata.get('lesion_mask')
    if lesion:  # filled and left out of the similarity (engine.register.register)
        lesion = bids_uri(lesion, bids_dir)
        sources.append(lesion)
    ent = parse_entities(in_file)
    kept = ('name', 'sha256', 'trained', 'used', 'passes')
    models = {kind: {k: v for k, v in card.items() if k in kept}
              for kind, card in metadata.get('models', {}).items()}
    common = {
        'Template': template,
        'TemplateSpec': spec,
        'Resolution': spec.get('res'),
        'RegistrationMode': metadata.get('mode'),
        'Lambda': metadata.get('lambda'),
        # iterations, metric, start, weight, cross_contrast asked, and what the deformable
        # refinement used (the metric auto picked, the lambda it ran at)
        'Refinement': metadata.get('refine', {'iterations': 0}),
        'Models': models,
        'Device': metadata.get('device'),
        'ElapsedTime': metadata.get('timings', {}).get('total'),
        'Software': {'Name': 'synthmorph-app', 'Version': __version__},
        'CommandLine': command_line,
    }
    if registration_settings:
        common['RegistrationSettings'] = registration_settings
    if input_files:
        common['InputFiles'] = input_files
    if common['Resolution'] is None:
        common.pop('Resolution')
    if metadata.get('noise_background_cleared'):
        # a background of noise (an MP2RAGE UNI image's) set to 0 before registering: the
        # share of each image's voxels (engine.intensity.clear_noisy_background)
        common['NoiseBackgroundCleared'] = metadata['noise_background_cleared']
    if lesion:
        common['LesionMask'] = lesion
    if metadata.get('warnings'):  # what the registration logged about these images
        common['Warnings'] = list(metadata['warnings'])
    via = metadata.get('via')
    if via:  # registered through the T1w of its session (engine.register.register_via)
        uri = bids_uri(via['image'], bids_dir) if via.get('image') else None
        if uri:
            sources.append(uri)
        common['Via'] = {
            'Image': uri,
            'RegistrationMode': via.get('mode'),
            # T1w RAS -> image RAS; the transforms are the T1w's to the template, then this
            'Matrix': via.get('matrix'),
            'Models': {kind: {k: v for k, v in card.items() if k in kept}
                       for kind, card in via.get('models', {}).items()},
            'Refinement': via.get('refine', {'iterations': 0}),
        }
    # the transforms are the registration's, whose fixed image may be another resolution of
    # the template than this space's (workflows.registration.registration_spaces)
    xfm_sources, xfm_common = sources, common
    fixed = metadata.get('fixed_image')
    if fixed and template_file and Path(fixed).name != Path(template_file).name:
        xfm_sources = [template_uri(fixed) if s == template_uri(template_file) else s
                       for s in sources]
        res = parse_entities(fixed).get('res', '')
        fixed_spec = {k: v for k, v in spec.items() if k != 'res'}
        xfm_common = {k: v for k, v in common.items() if k != 'Resolution'}
        if res.isdigit():
            fixed_spec['res'] = xfm_common['Resolution'] = str(int(res))
        xfm_common['TemplateSpec'] = fixed_spec
    plan = []  # (final path, source file or None, sidecar dict or None)
    plan.append((dest['space_image'], files['space_image'],
                 {'Sources': sources, 'SpatialReference': template, **common}))
    xfm_meta = {'Sources': xfm_sources, 'Type': 'ITK composite [affine, displacement field]'
                if metadata.get('mode') in ('joint', 'deform') else 'ITK composite [affine]'}
    linear_lta = output_lta and lta_desc(mode) is None
    if linear_lta:  # same name as the .h5 up to the extension: the sidecar serves both
        xfm_meta['LTA'] = ('The .lta file of this name holds this same transform as a '
                           'FreeSurfer LTA (LINEAR_RAS_TO_RAS; src = the FromSpace image grid, '
                           'dst = the ToSpace grid).')
    plan.append((dest['inverse_xfm'], files['inverse_xfm'],
                 {**xfm_meta, 'FromSpace': template, 'ToSpace': ent['suffix'], **xfm_common}))
    for key in ('before_after', 'jacobian_figure'):
        if files.get(key):
            plan.append((dest[key], files[key], None))
    if files.get('lesion_mask'):  # the lesion mask carried onto the template's grid
        plan.append((dest['lesion_mask'], files['lesion_mask'],
                     {'Type': 'Lesion',
                      'Sources': [s for s in (lesion, bids_uri(dest['forward_xfm'], out_dir, ''))
                                  if s],
                      'SpatialReference': template,
                      **({'Resolution': spec['res']} if 'res' in spec else {}),
                      'Description': 'The lesion mask resampled onto the template grid through '
                                     'the forward transform (linear, then 1 where at least '
                                     '0.5).'}))
    for key, src_space, dst_space in (('inverse_lta', template, ent['suffix']),
                                      ('forward_lta', ent['suffix'], template)):
        if not output_lta:
            break
        meta = None if linear_lta else {
            'Sources': [bids_uri(dest[key.replace('_lta', '_xfm')], out_dir, '')],
            'Type': 'FreeSurfer LTA (LINEAR_RAS_TO_RAS)',
            'Description': (
                f'LINEAR PART ONLY of the {mode} registration: the affine of the ITK '
                f'composite {dest[key.replace("_lta", "_xfm")].name}, without its '
                'displacement field. It is NOT the full transform from '
                f'{src_space} to {dst_space}; resample with the .h5 for that.'),
            'FromSpace': src_space, 'ToSpace': dst_space, **xfm_common,
        }
        plan.append((dest[key], files[key], meta))
    plan.append((dest['forward_xfm'], files['forward_xfm'],
                 {**xfm_meta, 'FromSpace': ent['suffix'], 'ToSpace': template, **xfm_common,
                  'Timings': metadata.get('timings', {}), 'QC': qc}))

    staged = []
    try:
        for final, src, meta in plan:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f'.{final.name}.{uuid.uuid4().hex}.tmp'
            shutil.copyfile(src, tmp)
            staged.append((tmp, final, meta))
        # a set written again (other settings, or unfinished): it stops looking complete
        # before any file of it changes, and keeps no file of the old set it does not have
        sidecar(dest['forward_xfm']).unlink(missing_ok=True)
        _remove_stale(out_dir, in_file, template, spec,
                      keep={p for final, _, meta in plan
                            for p in (final, sidecar(final) if meta is not None else None)})
        written = []
        for tmp, final, meta in staged:
            os.replace(tmp, final)
            written.append(str(final))
            if meta is not None:
                written.append(str(write_json_atomic(sidecar(final), meta)))
    finally:
        for tmp, _, _ in staged:
            tmp.unlink(missing_ok=True)
    return written


def _remove_stale(out_dir, in_file, template: str, spec: dict, keep: set) -> None:
    """Remove the files (and their sidecars) a set of derivatives of ``in_file`` in
    ``template`` may hold that are not in ``keep``: LTAs of either mode, the lesion, figures."""
    every = {path for lta_mode in ('affine', 'joint')
             for path in derivative_paths(out_dir, in_file, template, spec,
                                          lta_mode=lta_mode, lesion=True).values()}
    for path in every - keep:
        path.unlink(missing_ok=True)
        if sidecar(path) not in keep:
            sidecar(path).unlink(missing_ok=True)


class _DerivativesSinkInputSpec(BaseInterfaceInputSpec):
    out_dir = traits.Str(mandatory=True, desc='derivatives root')
    bids_dir = traits.Str(mandatory=True, desc='input BIDS root (for Sources URIs)')
    in_file = traits.Str(mandatory=True, desc='the registered BIDS image (path)')
    template = traits.Str(mandatory=True, desc='template name, e.g. MNI152NLin6Asym')
    template_spec = traits.Dict(desc='template entities, e.g. {"res": "2"}')
    template_file = File(desc='the template image registered to')
    template_mask = File(desc="the template's brain mask (a Source where the refinement used "
                         'it)')
    space_image = File(exists=True, mandatory=True, desc='image resampled on the template')
    forward_xfm = File(exists=True, mandatory=True, desc='image-to-template transform (.h5)')
    inverse_xfm = File(exists=True, mandatory=True, desc='template-to-image transform (.h5)')
    before_after = File(desc='flicker SVG')
    jacobian_figure = File(desc='Jacobian SVG')
    lesion_mask = File(desc='the lesion mask on the template grid, where one was given')
    metadata = traits.Dict(desc='registration metadata (mode, lambda, models, timings)')
    qc = traits.Dict(desc='QC metrics')
    command_line = traits.Str('', usedefault=True, desc='command line of this run')
    registration_settings = traits.Dict(
        desc='the settings that decided the registration (RegistrationSettings.signature), '
             'recorded in the sidecars with the checksums of the files read (inputs; their '
             'records as InputFiles); a rerun with other ones redoes the image')
    output_lta = traits.Bool(False, usedefault=True,
                             desc='also write FreeSurfer LTA files (the linear part of '
                                  'deformable transforms, named desc-linear)')


class _DerivativesSinkOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str, desc='written files')
    done = traits.Bool(desc='the set is complete')


class DerivativesSink(SimpleInterface):
    """Write a registration's derivatives (sMRIPrep names) atomically."""

    # always write, as Nipype's DataSink: a node found in the work directory's cache would
    # otherwise skip writing derivatives removed from the output folder since
    _always_run = True
    input_spec = _DerivativesSinkInputSpec
    output_spec = _DerivativesSinkOutputSpec

    def _run_interface(self, runtime):
        def opt(name):
            value = getattr(self.inputs, name)
            return value if isdefined(value) else None

        files = {k: opt(k) for k in ('space_image', 'forward_xfm', 'inverse_xfm',
                                     'before_after', 'jacobian_figure', 'lesion_mask')}
        settings, input_files = opt('registration_settings') or None, None
        if settings:  # the files the registration read (utils.bids.input_records)
            input_files = input_records(self.inputs.in_file, settings.get('via_t1w', False))
            settings = {**settings, 'inputs': {name: record['sha256']
                                               for name, record in input_files.items()}}
        self._results['out_files'] = save_derivatives(
            self.inputs.out_dir, self.inputs.bids_dir, self.inputs.in_file, self.inputs.template,
            opt('template_spec') or {}, files, metadata=opt('metadata') or {},
            qc=opt('qc') or {}, template_file=opt('template_file'),
            template_mask=opt('template_mask'), command_line=self.inputs.command_line,
            output_lta=self.inputs.output_lta,
            registration_settings=settings, input_files=input_files,
        )
        self._results['done'] = True
        return runtime
