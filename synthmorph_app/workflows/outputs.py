"""Sinks: write derivatives apart from compute (sdcflows/sMRIPrep ``outputs.py`` pattern)."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..interfaces.derivatives import DerivativesSink

DS_FIELDS = ['template', 'template_spec', 'template_file', 'template_mask', 'space_image',
             'forward_xfm', 'inverse_xfm', 'before_after', 'jacobian_figure', 'metadata', 'qc',
             'lesion_mask']


def init_ds_registration_wf(
    *,
    out_dir: str,
    bids_dir: str,
    in_file: str,
    command_line: str = '',
    output_lta: bool = False,
    registration_settings: dict | None = None,
    name: str = 'ds_registration_wf',
):
    """Write one image's registration to one template as BIDS derivatives, atomically.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from synthmorph_app.workflows.outputs import init_ds_registration_wf
            wf = init_ds_registration_wf(out_dir='out', bids_dir='bids',
                                         in_file='sub-01_T1w.nii.gz')

    Parameters
    ----------
    out_dir, bids_dir
        Derivatives root and input BIDS root.
    in_file
        The registered BIDS image (its entities name the outputs).
    command_line
        Recorded in the sidecars.
    output_lta
        Also write FreeSurfer LTA files (for joint/deform only the linear part, named
        ``desc-linear``).
    registration_settings
        The settings that decided the registration
        (:meth:`~synthmorph_app.workflows.settings.RegistrationSettings.signature`), recorded
        in the sidecars as ``RegistrationSettings``, with the checksums of the files the
        registration read (``inputs``; their records as ``InputFiles``).

    Inputs
    ------
    template, template_spec, template_file, template_mask, space_image, forward_xfm,
    inverse_xfm, before_after, jacobian_figure, metadata, qc, lesion_mask
        As produced by :func:`~synthmorph_app.workflows.registration.init_register_template_wf`
        and :class:`~synthmorph_app.interfaces.reports.ImageQC`.

    Outputs
    -------
    out_files
        The files written.
    """
    workflow = Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=DS_FIELDS), name='inputnode')
    outputnode = pe.Node(niu.IdentityInterface(fields=['out_files']), name='outputnode')
    sink = pe.Node(
        DerivativesSink(out_dir=str(out_dir), bids_dir=str(bids_dir), in_file=str(in_file),
                        command_line=command_line, output_lta=output_lta,
                        registration_settings=registration_settings or {}),
        name='ds_registration', run_without_submitting=True,
    )
    workflow.connect([
        (inputnode, sink, [(f, f) for f in DS_FIELDS]),
        (sink, outputnode, [('out_files', 'out_files')]),
    ])  # fmt:skip
    return workflow
