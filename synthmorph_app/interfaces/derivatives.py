"""Write one image's derivatives for one template, atomically, with BIDS sidecars.

Everything is copied to hidden temporary names first and then renamed into place; the forward
transform's JSON sidecar is renamed last and marks the set as complete (:func:`is_complete`),
so an interrupted run never leaves a set that looks finished, and a rerun redoes it.

>>> from synthmorph_app.interfaces.derivatives import DerivativesSink
>>> sorted(DerivativesSink().output_spec().get())
['done', 'out_files']
"""

from __future__ import annotations

import os
import shutil
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
    parse_entities,
    space_name,
    write_json_atomic,
    xfm_name,
)


def derivative_paths(out_dir, in_file, template: str, spec: dict) -> dict:
    """Where the derivatives of ``in_file`` in ``template`` go (keys: kinds of file)."""
    ent = parse_entities(in_file)
    sub_dir = Path(out_dir) / f'sub-{ent["sub"]}'
    anat = sub_dir / (f'ses-{ent["ses"]}' if ent.get('ses') else '') / 'anat'
    figs = sub_dir / 'figures'
    fig_spec = {k: v for k, v in spec.items() if k == 'cohort'}
    return {
        'space_image': anat / space_name(ent, template, spec),
        'inverse_xfm': anat / xfm_name(ent, template, inverse=True),
        'forward_xfm': anat / xfm_name(ent, template),
        'before_after': figs / space_name(ent, template, fig_spec, desc='reg', ext='.svg'),
        'jacobian_figure': figs / space_name(ent, template, fig_spec, desc='jacobian',
                                             ext='.svg'),
    }


def sidecar(path: Path) -> Path:
    name = path.name
    for ext in ('.nii.gz', '.nii', '.h5'):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + '.json')
    return path.with_suffix('.json')


def is_complete(out_dir, in_file, template: str, spec: dict) -> bool:
    """True when the derivatives of ``in_file`` in ``template`` were all written."""
    return sidecar(derivative_paths(out_dir, in_file, template, spec)['forward_xfm']).is_file()


def save_derivatives(
    out_dir, bids_dir, in_file, template: str, spec: dict, files: dict, *, metadata: dict,
    qc: dict, template_file=None, command_line: str = '', templateflow_home=None,
) -> list[str]:
    """Copy ``files`` (keys as :func:`derivative_paths`) into ``out_dir`` with sidecars."""
    from .. import __version__

    dest = derivative_paths(out_dir, in_file, template, spec)
    sources = [bids_uri(in_file, bids_dir)]
    if template_file:
        home = templateflow_home or os.environ.get('TEMPLATEFLOW_HOME')
        tpl_uri = bids_uri(template_file, home, 'templateflow') if home else None
        sources.append(tpl_uri or str(template_file))
    ent = parse_entities(in_file)
    models = {kind: {k: v for k, v in card.items() if k in ('name', 'sha256', 'trained')}
              for kind, card in metadata.get('models', {}).items()}
    common = {
        'Template': template,
        'TemplateSpec': spec,
        'Resolution': spec.get('res'),
        'RegistrationMode': metadata.get('mode'),
        'Lambda': metadata.get('lambda'),
        'Models': models,
        'Device': metadata.get('device'),
        'ElapsedTime': metadata.get('timings', {}).get('total'),
        'Software': {'Name': 'synthmorph-app', 'Version': __version__},
        'CommandLine': command_line,
    }
    if common['Resolution'] is None:
        common.pop('Resolution')
    plan = []  # (final path, source file or None, sidecar dict or None)
    plan.append((dest['space_image'], files['space_image'],
                 {'Sources': sources, 'SpatialReference': template, **common}))
    xfm_meta = {'Sources': sources, 'Type': 'ITK composite [affine, displacement field]'
                if metadata.get('mode') in ('joint', 'deform') else 'ITK composite [affine]'}
    plan.append((dest['inverse_xfm'], files['inverse_xfm'],
                 {**xfm_meta, 'FromSpace': template, 'ToSpace': ent['suffix'], **common}))
    for key in ('before_after', 'jacobian_figure'):
        if files.get(key):
            plan.append((dest[key], files[key], None))
    plan.append((dest['forward_xfm'], files['forward_xfm'],
                 {**xfm_meta, 'FromSpace': ent['suffix'], 'ToSpace': template, **common,
                  'Timings': metadata.get('timings', {}), 'QC': qc}))

    staged = []
    try:
        for final, src, meta in plan:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f'.{final.name}.{uuid.uuid4().hex}.tmp'
            shutil.copyfile(src, tmp)
            staged.append((tmp, final, meta))
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


class _DerivativesSinkInputSpec(BaseInterfaceInputSpec):
    out_dir = traits.Str(mandatory=True, desc='derivatives root')
    bids_dir = traits.Str(mandatory=True, desc='input BIDS root (for Sources URIs)')
    in_file = traits.Str(mandatory=True, desc='the registered BIDS image (path)')
    template = traits.Str(mandatory=True, desc='template name, e.g. MNI152NLin6Asym')
    template_spec = traits.Dict(desc='template entities, e.g. {"res": "2"}')
    template_file = File(desc='the template image registered to')
    space_image = File(exists=True, mandatory=True, desc='image resampled on the template')
    forward_xfm = File(exists=True, mandatory=True, desc='image-to-template transform (.h5)')
    inverse_xfm = File(exists=True, mandatory=True, desc='template-to-image transform (.h5)')
    before_after = File(desc='flicker SVG')
    jacobian_figure = File(desc='Jacobian SVG')
    metadata = traits.Dict(desc='registration metadata (mode, lambda, models, timings)')
    qc = traits.Dict(desc='QC metrics')
    command_line = traits.Str('', usedefault=True, desc='command line of this run')


class _DerivativesSinkOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str, desc='written files')
    done = traits.Bool(desc='the set is complete')


class DerivativesSink(SimpleInterface):
    """Write a registration's derivatives (sMRIPrep names) atomically."""

    input_spec = _DerivativesSinkInputSpec
    output_spec = _DerivativesSinkOutputSpec

    def _run_interface(self, runtime):
        def opt(name):
            value = getattr(self.inputs, name)
            return value if isdefined(value) else None

        files = {k: opt(k) for k in ('space_image', 'forward_xfm', 'inverse_xfm',
                                     'before_after', 'jacobian_figure')}
        self._results['out_files'] = save_derivatives(
            self.inputs.out_dir, self.inputs.bids_dir, self.inputs.in_file, self.inputs.template,
            opt('template_spec') or {}, files, metadata=opt('metadata') or {},
            qc=opt('qc') or {}, template_file=opt('template_file'),
            command_line=self.inputs.command_line,
        )
        self._results['done'] = True
        return runtime
