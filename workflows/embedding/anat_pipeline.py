#!/usr/bin/env python
"""An fMRIPrep-like anatomical pipeline that embeds synthmorph-app's template registration.

This is an example for pipeline authors: a small Nipype workflow in the style of sMRIPrep's
``init_anat_fit_wf`` where the spatial normalisation is our
:func:`synthmorph_app.workflows.registration.init_register_template_wf`, spliced in by the
field names sMRIPrep uses (``inputnode.moving_image``; ``anat2std_xfm``, ``std2anat_xfm``,
``template``, ``template_spec``), next to other nodes:

    T1w -> ValidateImage -> IntensityClip ----------> desc-preproc_T1w
                                 |
                                 +-> register_template_wf (ours, one run per template)
                                          |  anat2std_xfm -> SynthMorphApply -> space-<tpl>_T1w
                                          |  std2anat_xfm -> SynthMorphApply(template mask)
                                          |                    -> desc-brain_mask (T1w space)
                                          +-> from-T1w_to-<tpl> / from-<tpl>_to-T1w xfm.h5

Outputs are named as fMRIPrep names them (niworkflows' ``DerivativesDataSink``), so fMRIPrep
can reuse the transforms (``--derivatives``; see ``docs/fmriprep.md``).

:func:`splice_registration` shows the other way in: build a pipeline around a tagged
registration workflow, then swap in another one with niworkflows' splicer.

Run it on a BIDS dataset (templates come from ``$TEMPLATEFLOW_HOME`` or the package)::

    python workflows/embedding/anat_pipeline.py BIDS_DIR OUTPUT_DIR --participant-label 01 \\
        [--output-spaces MNI152NLin6Asym:res-2] [-w WORK_DIR] [--nprocs N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault('NIPYPE_NO_ET', '1')

from synthmorph_app.utils.templates import setup_templateflow_home

# TemplateFlow reads its home when first imported, and niworkflows' BIDS interfaces import it:
# choose the home (the user's, or one that adds the packaged templates) before that.
setup_templateflow_home()

from niworkflows.interfaces.bids import DerivativesDataSink as _DerivativesDataSink

#: The tag under which the registration sub-workflow can be found and replaced.
REGISTRATION_TAG = 'anat.register_template'


class DerivativesDataSink(_DerivativesDataSink):
    """niworkflows' sink, writing under ``base_directory`` itself (not ``.../niworkflows``)."""

    out_path_base = ''


def init_anat_preproc_wf(
    *,
    t1w: str,
    output_dir: str,
    templates: list[str],
    mode: str = 'joint',
    extent: float = 256.0,
    device: str = 'cpu',
    omp_nthreads: int = 1,
    name: str = 'anat_preproc_wf',
):
    """Validate and clip a T1w image, normalise it to ``templates``, write derivatives.

    Parameters
    ----------
    t1w
        The BIDS T1w image (its entities name the outputs).
    output_dir
        Derivatives root.
    templates
        Output spaces in fMRIPrep syntax, e.g. ``['MNI152NLin6Asym:res-2']``.
    mode, extent, device, omp_nthreads
        Passed to ``init_register_template_wf``.

    Outputs
    -------
    t1w_preproc
        The clipped T1w.
    anat2std_xfm, std2anat_xfm, template
        Lists, one entry per template (as sMRIPrep's ``outputnode``).
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe
    from niworkflows.engine import tag
    from niworkflows.engine.workflows import LiterateWorkflow as Workflow
    from niworkflows.interfaces.header import ValidateImage
    from niworkflows.interfaces.nibabel import IntensityClip

    from synthmorph_app.interfaces.synthmorph import SynthMorphApply
    from synthmorph_app.workflows.registration import init_register_template_wf

    workflow = Workflow(name=name)
    workflow.__desc__ = (
        'The T1w image was validated and its intensities clipped (niworkflows), then '
        'normalised to standard space as follows.\n'
    )
    inputnode = pe.Node(niu.IdentityInterface(fields=['t1w']), name='inputnode')
    inputnode.inputs.t1w = t1w
    outputnode = pe.Node(niu.IdentityInterface(
        fields=['t1w_preproc', 'anat2std_xfm', 'std2anat_xfm', 'template']), name='outputnode')

    anat_validate = pe.Node(ValidateImage(), name='anat_validate')
    clip = pe.Node(IntensityClip(p_min=10.0, p_max=99.5, dtype='float32'), name='clip')
    # The spliced component: same ports as sMRIPrep's registration workflow. tag() lets a
    # caller find it again (splice_registration below).
    register_template_wf = tag(REGISTRATION_TAG)(init_register_template_wf)(
        templates=templates, mode=mode, extent=extent, device=device,
        omp_nthreads=omp_nthreads, image_type='T1w')
    # Other nodes reuse the transforms: the T1w onto each template's grid ...
    std_t1w = pe.Node(SynthMorphApply(interpolation='linear', out_name='std_T1w.nii.gz'),
                      name='std_t1w')
    # ... and the template's brain mask into the T1w (an atlas-based brain mask)
    t1w_mask = pe.Node(SynthMorphApply(interpolation='nearest', out_name='brain_mask.nii.gz'),
                       name='t1w_mask')
    resolution = pe.Node(niu.Function(function=_resolution), name='resolution',
                         run_without_submitting=True)

    def sink(name, **entities):
        return pe.Node(DerivativesDataSink(base_directory=output_dir, source_file=t1w,
                                           **entities), name=name, run_without_submitting=True)

    ds_preproc = sink('ds_preproc', desc='preproc', compress=True)
    ds_anat2std = sink('ds_anat2std_xfm', suffix='xfm', mode='image', **{'from': 'T1w'})
    ds_std2anat = sink('ds_std2anat_xfm', suffix='xfm', mode='image', to='T1w')
    ds_std_t1w = sink('ds_std_t1w', desc='preproc', compress=True)
    ds_mask = sink('ds_t1w_mask', desc='brain', suffix='mask', compress=True)

    workflow.connect([
        (inputnode, anat_validate, [('t1w', 'in_file')]),
        (anat_validate, clip, [('out_file', 'in_file')]),
        (clip, register_template_wf, [('out_file', 'inputnode.moving_image')]),
        (clip, ds_preproc, [('out_file', 'in_file')]),
        (clip, std_t1w, [('out_file', 'in_file')]),
        (clip, t1w_mask, [('out_file', 'reference_image')]),
        (register_template_wf, std_t1w, [('poutputnode.anat2std_xfm', 'transform'),
                                         ('poutputnode.template_file', 'reference_image')]),
        (register_template_wf, t1w_mask, [('poutputnode.std2anat_xfm', 'transform'),
                                          ('poutputnode.template_mask', 'in_file')]),
        (register_template_wf, resolution, [('poutputnode.template_file', 'template_file')]),
        (register_template_wf, ds_anat2std, [('poutputnode.anat2std_xfm', 'in_file'),
                                             ('poutputnode.template', 'to')]),
        (register_template_wf, ds_std2anat, [('poutputnode.std2anat_xfm', 'in_file'),
                                             ('poutputnode.template', 'from')]),
        (register_template_wf, ds_std_t1w, [('poutputnode.template', 'space')]),
        (resolution, ds_std_t1w, [('out', 'resolution')]),
        (std_t1w, ds_std_t1w, [('out_file', 'in_file')]),
        (t1w_mask, ds_mask, [('out_file', 'in_file')]),
        (clip, outputnode, [('out_file', 't1w_preproc')]),
        (register_template_wf, outputnode, [('outputnode.anat2std_xfm', 'anat2std_xfm'),
                                            ('outputnode.std2anat_xfm', 'std2anat_xfm'),
                                            ('outputnode.template', 'template')]),
    ])  # fmt:skip
    return workflow


def splice_registration(workflow, replacement):
    """Replace the tagged registration sub-workflow of ``workflow`` by ``replacement``.

    ``replacement`` must have the same ports (any sMRIPrep-compatible registration workflow,
    e.g. ours with other settings, or sMRIPrep's own). Uses niworkflows' splicer, which
    rewires every connection of the tagged workflow to the replacement.
    """
    from niworkflows.engine.splicer import splice_workflow

    return splice_workflow(workflow, {REGISTRATION_TAG: replacement})


def _resolution(template_file):
    """The ``res`` entity of a TemplateFlow file name (``tpl-X_res-02_T1w`` -> ``'2'``)."""
    import re
    from pathlib import Path

    match = re.search(r'_res-(\d+)_', Path(template_file).name)
    return str(int(match.group(1))) if match else 'native'


def find_t1w(bids_dir: Path, participant: str) -> str:
    """The participant's first T1w image (a real pipeline would query pybids)."""
    found = sorted((bids_dir / f'sub-{participant}').glob('**/anat/*_T1w.nii*'))
    if not found:
        raise FileNotFoundError(f'no T1w image for sub-{participant} in <{bids_dir}>')
    return str(found[0])


def write_dataset_description(output_dir: Path) -> Path:
    """A BIDS-Derivatives ``dataset_description.json`` (fMRIPrep's ``--derivatives`` needs it)."""
    import json

    from synthmorph_app import __version__

    path = output_dir / 'dataset_description.json'
    if not path.exists():
        output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            'Name': 'anat_pipeline example (synthmorph-app registration)',
            'BIDSVersion': '1.9.0', 'DatasetType': 'derivative',
            'GeneratedBy': [{'Name': 'synthmorph-app', 'Version': __version__,
                             'Description': 'workflows/embedding/anat_pipeline.py'}],
        }, indent=2) + '\n')
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('bids_dir', type=Path)
    parser.add_argument('output_dir', type=Path)
    parser.add_argument('--participant-label', required=True)
    parser.add_argument('--output-spaces', nargs='+', default=['MNI152NLin6Asym:res-2'])
    parser.add_argument('--mode', default='joint', choices=('joint', 'affine', 'rigid'))
    parser.add_argument('--extent', type=float, default=256.0)
    parser.add_argument('-w', '--work-dir', type=Path, default=Path('work'))
    parser.add_argument('--nprocs', type=int, default=1)
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'),
                        help='where the registration runs (default cpu)')
    parser.add_argument('-v', '--verbose', action='store_true', help="Nipype's INFO messages")
    args = parser.parse_args(argv)
    from nipype import config, logging

    level = 'INFO' if args.verbose else 'WARNING'
    config.update_config({'logging': {'workflow_level': level, 'interface_level': level}})
    logging.update_logging(config)

    work_dir = args.work_dir.absolute()
    label = args.participant_label.removeprefix('sub-')
    workflow = init_anat_preproc_wf(
        t1w=find_t1w(args.bids_dir.absolute(), label),
        output_dir=str(args.output_dir.absolute()), templates=args.output_spaces,
        mode=args.mode, extent=args.extent, device=args.device,
        name=f'anat_preproc_sub_{label}_wf')
    workflow.base_dir = str(work_dir)
    workflow.config['execution'].update(
        crashdump_dir=str(work_dir / 'crash'), poll_sleep_duration=0.1,
        remove_unnecessary_outputs=False)
    write_dataset_description(args.output_dir.absolute())
    print(workflow.visit_desc())
    plugin = ('MultiProc', {'n_procs': args.nprocs}) if args.nprocs > 1 else ('Linear', {})
    if args.device == 'cuda' and args.nprocs > 1:
        # workers forked after torch touched CUDA cannot use it: start them from a fork server,
        # and let the registrations take the GPU one at a time (workflows/README.md)
        plugin[1].update(mp_context='forkserver', n_gpu_procs=1)
    workflow.run(plugin=plugin[0], plugin_args=plugin[1])
    print(f'derivatives in <{args.output_dir.absolute()}>')
    return 0


if __name__ == '__main__':
    sys.exit(main())
