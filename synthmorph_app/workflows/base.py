"""The whole app: per-subject and per-image workflows.

>>> from synthmorph_app.workflows.base import init_anat_image_wf
>>> wf = init_anat_image_wf(in_file='/data/sub-01/anat/sub-01_T1w.nii.gz',
...                         templates=['MNI152NLin6Asym:res-2'], out_dir='/out',
...                         bids_dir='/data')
>>> wf.name
'anat_sub01_T1w_wf'
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..interfaces.reports import ImageQC
from ..utils.bids import image_id, image_lesion, parse_entities, session_t1w
from .outputs import init_ds_registration_wf
from .registration import init_register_template_wf
from .settings import OutputSettings, RegistrationSettings


def init_synthmorph_wf(
    *,
    plan: dict[str, list[tuple[str, list[str]]]],
    out_dir: str,
    bids_dir: str,
    settings: RegistrationSettings | None = None,
    outputs: OutputSettings | None = None,
    name: str = 'synthmorph_wf',
):
    """Build the app's workflow: one sub-workflow per subject.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from synthmorph_app.workflows.base import init_synthmorph_wf
            wf = init_synthmorph_wf(
                plan={'01': [('/data/sub-01/anat/sub-01_T1w.nii.gz',
                              ['MNI152NLin6Asym:res-2'])]},
                out_dir='/out', bids_dir='/data')

    Parameters
    ----------
    plan
        Subject label -> list of ``(image path, output spaces still to compute)``.
    out_dir, bids_dir
        Derivatives root and input BIDS root.
    settings
        How images are registered (:class:`~.settings.RegistrationSettings`, defaults).
    outputs
        Figures, recorded command line, LTA copies (:class:`~.settings.OutputSettings`).
    """
    workflow = Workflow(name=name)
    for subject, images in sorted(plan.items()):
        workflow.add_nodes([init_single_subject_wf(
            subject_id=subject, images=images, out_dir=out_dir, bids_dir=bids_dir,
            settings=settings, outputs=outputs,
        )])
    return workflow


def init_single_subject_wf(*, subject_id: str, images: list[tuple[str, list[str]]],
                           name: str | None = None, **kwargs):
    """One subject: an :func:`init_anat_image_wf` per anatomical image.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from synthmorph_app.workflows.base import init_single_subject_wf
            wf = init_single_subject_wf(
                subject_id='01', out_dir='/out', bids_dir='/data',
                images=[('/data/sub-01/anat/sub-01_T1w.nii.gz', ['MNI152NLin6Asym:res-2'])])

    Parameters
    ----------
    subject_id
        Label without ``sub-``.
    images
        ``(image path, output spaces)`` pairs.
    kwargs
        Passed to :func:`init_anat_image_wf`.
    """
    workflow = Workflow(name=name or subject_wf_name(subject_id))
    workflow.__desc__ = f"""
Results included in this manuscript come from registration performed using *synthmorph-app*
on subject {subject_id}'s anatomical images, executed with *Nipype* [@nipype1].
"""
    for in_file, templates in images:
        workflow.add_nodes([init_anat_image_wf(in_file=str(in_file), templates=templates,
                                               **kwargs)])
    return workflow


def init_anat_image_wf(
    *,
    in_file: str,
    templates: list[str],
    out_dir: str,
    bids_dir: str,
    settings: RegistrationSettings | None = None,
    outputs: OutputSettings | None = None,
    name: str | None = None,
):
    """One image: register to every template, QC, and write the derivatives.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from synthmorph_app.workflows.base import init_anat_image_wf
            wf = init_anat_image_wf(in_file='/data/sub-01/anat/sub-01_T1w.nii.gz',
                                    templates=['MNI152NLin6Asym:res-2'], out_dir='/out',
                                    bids_dir='/data')

    Parameters
    ----------
    in_file
        The BIDS image.
    templates
        Output spaces (fMRIPrep syntax).
    out_dir, bids_dir, settings, outputs
        See :func:`init_synthmorph_wf`.

    Inputs
    ------
    in_file
        Set to ``in_file`` already.

    Outputs
    -------
    out_files
        Lists of written derivatives, one list per template.
    """
    entities = parse_entities(in_file)
    workflow = Workflow(name=name or image_wf_name(in_file))
    inputnode = pe.Node(niu.IdentityInterface(fields=['in_file']), name='inputnode')
    inputnode.inputs.in_file = in_file
    outputnode = pe.Node(niu.IdentityInterface(fields=['out_files']), name='outputnode')
    settings = settings or RegistrationSettings()
    outputs = outputs or OutputSettings()
    kwargs = settings.register_kwargs()
    via = session_t1w(in_file) if settings.via_t1w else None
    kwargs['via_t1w'] = via is not None
    register_wf = init_register_template_wf(
        templates=templates, image_type=entities['suffix'], **kwargs,
    )
    if via is not None:
        register_wf.inputs.inputnode.via_image = str(via)
    # a lesion mask drawn on the T1w (fMRIPrep's *_label-lesion_roi): for the T1w's own job
    # and the jobs that go through it; another contrast registered on its own goes without
    lesion = image_lesion(in_file, via)
    if lesion is not None:
        register_wf.inputs.inputnode.lesion_mask = str(lesion)
        register_wf.__desc__ += (
            'A lesion mask was used: the lesion was filled from the tissue around it and '
            'left out of the image similarity (cost-function masking [@brett2001]).\n')
    image_qc = pe.Node(ImageQC(figures=outputs.figures), name='image_qc', mem_gb=1.0)
    # the checksums of the files read join the settings where the derivatives are written
    ds_wf = init_ds_registration_wf(
        out_dir=out_dir, bids_dir=bids_dir, in_file=in_file, command_line=outputs.command_line,
        output_lta=outputs.output_lta,
        registration_settings=settings.signature(via=via is not None))
    gather = pe.JoinNode(niu.IdentityInterface(fields=['out_files']), name='gather',
                         joinsource='register_template_wf.inputnode', joinfield=['out_files'])
    workflow.connect([
        (inputnode, register_wf, [('in_file', 'inputnode.moving_image')]),
        (inputnode, image_qc, [('in_file', 'moving_image')]),
        (register_wf, image_qc, [('poutputnode.std_image', 'moved_image'),
                                 ('poutputnode.template_file', 'template'),
                                 ('poutputnode.template_mask', 'template_mask'),
                                 ('poutputnode.log_jacobian', 'log_jacobian')]),
        (register_wf, ds_wf, [('poutputnode.template', 'inputnode.template'),
                              ('poutputnode.template_spec', 'inputnode.template_spec'),
                              ('poutputnode.template_file', 'inputnode.template_file'),
                              ('poutputnode.template_mask', 'inputnode.template_mask'),
                              ('poutputnode.std_image', 'inputnode.space_image'),
                              ('poutputnode.anat2std_xfm', 'inputnode.forward_xfm'),
                              ('poutputnode.std2anat_xfm', 'inputnode.inverse_xfm'),
                              ('poutputnode.metadata', 'inputnode.metadata')]),
        (image_qc, ds_wf, [('qc', 'inputnode.qc'),
                           ('before_after', 'inputnode.before_after'),
                           ('jacobian_figure', 'inputnode.jacobian_figure')]),
        (ds_wf, gather, [('outputnode.out_files', 'out_files')]),
        (gather, outputnode, [('out_files', 'out_files')]),
    ])  # fmt:skip
    if lesion is not None:  # the lesion in template space is left out of the QC metrics
        workflow.connect(register_wf, 'poutputnode.std_lesion_mask', image_qc, 'lesion_mask')
    if lesion is not None and via is None:
        # the lesion in template space, written once: by the job of the T1w it was drawn on
        workflow.connect(register_wf, 'poutputnode.std_lesion_mask', ds_wf,
                         'inputnode.lesion_mask')
    return workflow


def image_work_dir(base_dir, subject_id: str, in_file, name: str = 'synthmorph_wf') -> Path:
    """Where :func:`init_synthmorph_wf` (run with ``base_dir``) keeps the intermediate files of
    one image: its :func:`init_anat_image_wf` folder.

    >>> image_work_dir('/work', '01', '/data/sub-01/anat/sub-01_T1w.nii.gz').as_posix()
    '/work/synthmorph_wf/sub_01_wf/anat_sub01_T1w_wf'
    """
    return Path(base_dir) / name / subject_wf_name(subject_id) / image_wf_name(in_file)


def subject_wf_name(subject_id: str) -> str:
    """The name of :func:`init_single_subject_wf` for a subject (``sub_01_wf``)."""
    return f'sub_{_safe(subject_id)}_wf'


def image_wf_name(in_file) -> str:
    """The name of :func:`init_anat_image_wf` for an image (``anat_sub01_T1w_wf``): Nipype's
    crash files and status callbacks name its nodes by it."""
    return f'anat_{image_id(parse_entities(in_file))}_wf'


def _safe(label: str) -> str:
    return ''.join(c if c.isalnum() else '_' for c in label)
