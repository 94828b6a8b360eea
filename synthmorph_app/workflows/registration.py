"""Registration of an anatomical image to templates: a drop-in for sMRIPrep's workflow."""

from __future__ import annotations

import json
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from .. import __version__
from ..engine import DEFAULT_REFINE
from ..interfaces.derivatives import LINEAR_MODES
from ..interfaces.synthmorph import SynthMorphRegister

DATA = Path(__file__).resolve().parents[1] / 'data'

#: Outputs of sMRIPrep's ``init_register_template_wf``, then ours.
SMRIPREP_OUTPUTS = ['anat2std_xfm', 'std2anat_xfm', 'template', 'template_spec']
EXTRA_OUTPUTS = ['std_image', 'template_file', 'template_mask', 'log_jacobian', 'metadata',
                 'std_lesion_mask']


def load_tunables() -> dict:
    """Resource tunables of the registration node (``data/registration.json``)."""
    return json.loads((DATA / 'registration.json').read_text())


def init_register_template_wf(
    *,
    templates: list[str],
    mode: str = 'joint',
    lam: float = 0.5,
    extent: float = 256.0,
    passes: int = 1,
    refine: int = DEFAULT_REFINE,
    refine_options: dict | None = None,
    weights: dict | None = None,
    device: str = 'cpu',
    omp_nthreads: int = 1,
    image_type: str = 'T1w',
    via_t1w: bool = False,
    cache_dir: str | None = None,
    name: str = 'register_template_wf',
):
    """Register an anatomical image to one or more templates with SynthMorph.

    Same ports as sMRIPrep's ``init_register_template_wf`` (so an fMRIPrep-like pipeline can
    swap it in): ``inputnode.template`` iterates over ``templates``; ``poutputnode`` holds one
    template's results, ``outputnode`` joins them all into lists.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from synthmorph_app.workflows.registration import init_register_template_wf
            wf = init_register_template_wf(templates=['MNI152NLin6Asym:res-2'])

    Parameters
    ----------
    templates
        Output spaces in fMRIPrep syntax (``MNI152NLin6Asym:res-2``). Several resolutions of
        one template share one registration, to the first listed of them (the transform files
        are named by the template alone, as sMRIPrep's): the image is resampled onto each.
    mode, lam, extent, passes, refine, refine_options, weights, device
        Passed to :class:`~synthmorph_app.interfaces.synthmorph.SynthMorphRegister`.
    omp_nthreads
        CPU threads of the registration node (its ``n_procs``).
    image_type
        Contrast of the moving image (any: SynthMorph is contrast-agnostic). The templates are
        T1w, so unless ``refine_options`` says otherwise (``cross_contrast``), another
        contrast tells the refinement that the images differ in contrast, and a T1-weighted
        one (:data:`..utils.bids.T1_LIKE`: T1w, an MP2RAGE UNIT1, inplaneT1) that they do
        not. In the deformable modes the same tells the metric where ``refine_metric`` is
        ``'auto'`` or missing: MIND across contrasts; within one, ``auto`` keeps local NCC
        unless the intensities run opposite ways (an infant's T1w, grey and white matter
        swapped: MIND; :func:`.engine.similarity.auto_threshold`). The image check with its
        usual bar took a whole-head T1w for another contrast against the whole-head template
        (MIND then gave 0.004 lower mean Dice, 0.04 on that subject), and most FLAIRs for T1w
        (local NCC then gave 0.025 lower mean Dice onto the template)
        (``benchmarks/README.md``, ``mni_head_bench.py``).
    via_t1w
        Register through the same person's T1w, given at ``inputnode.via_image``: the image is
        aligned to it rigidly, the T1w is registered to each template (as a T1w: same
        contrast), and the transforms are the two composed
        (:func:`~synthmorph_app.engine.register.register_via`).
    cache_dir
        A folder where the registrations to the templates are kept, so that the T1w's own job
        and the jobs that go through it compute each only once (:mod:`~synthmorph_app.engine.cache`).

    Inputs
    ------
    moving_image
        The anatomical image to normalise.
    moving_mask
        Optional brain mask of the moving image (sMRIPrep's port): with ``refine`` it weights
        the affine refinement in place of our rough brain estimate.
    lesion_mask
        Optional lesion mask (non-zero in a stroke, a resection cavity, a tumour) in the space
        of the moving image, or of ``via_image`` with ``via_t1w`` (sMRIPrep's port, in T1w
        space): the lesion is filled from the tissue around it and left out of the
        similarity (cost-function masking, :func:`~synthmorph_app.engine.register.register`).
    via_image
        With ``via_t1w``: the T1w of the same person (and session).
    template
        Iterable: one template specification per expansion.

    Outputs
    -------
    anat2std_xfm
        Image-to-template transform (ITK composite ``.h5``).
    std2anat_xfm
        Template-to-image transform.
    template, template_spec
        Template name and its entities (``{'res': '2'}``).
    std_image, template_file, template_mask, log_jacobian, metadata
        Ours: the image on the template grid, the template and brain mask files, the
        Jacobian determinant map and the registration's metadata.
    std_lesion_mask
        With ``lesion_mask``: the lesion on the template grid (uint8), as lesion-symptom
        mapping needs it.
    """
    from ..utils.templates import get_template_metadata, parse_output_spaces

    workflow = Workflow(name=name)
    parsed = parse_output_spaces(templates)
    names = ', '.join(f'*{get_template_metadata(n).get("Name", n)}* '
                      f'[@{n.lower()}; TemplateFlow ID: {n}]' for n, _ in parsed)
    through = ('aligned rigidly to the T1w image of the same session, which was '
               if via_t1w else '')
    workflow.__desc__ = f"""\
The {image_type} image was {through}registered to {len(parsed)} standard space{'s' * (len(parsed) > 1)}
({names}) with SynthMorph [@synthmorph; @hoffmann2024], using synthmorph-app {__version__}
[@synthmorphapp],
a PyTorch [@pytorch] re-implementation built on VoxelMorph [@voxelmorph].
{_mode_text(mode, lam, passes)}{_refine_text(refine, refine_options, mode, lam)}{_via_text(via_t1w)} Templates were
accessed offline through *TemplateFlow* [@templateflow].
"""
    inputnode = pe.Node(
        niu.IdentityInterface(fields=['lesion_mask', 'moving_image', 'moving_mask', 'template',
                                      'via_image']),
        name='inputnode',
    )
    inputnode.iterables = [('template', list(templates))]
    out_fields = SMRIPREP_OUTPUTS + EXTRA_OUTPUTS
    poutputnode = pe.Node(niu.IdentityInterface(fields=out_fields), name='poutputnode')
    outputnode = pe.JoinNode(niu.IdentityInterface(fields=out_fields), name='outputnode',
                             joinsource='inputnode')

    split_desc = pe.Node(niu.Function(function=_split_template,
                                      output_names=['name', 'spec']),
                         name='split_desc', run_without_submitting=True)
    tf_select = pe.Node(niu.Function(function=_select_template,
                                     output_names=['t1w_file', 'brain_mask']),
                        name='tf_select', run_without_submitting=True)
    # what the image is registered to: the first listed resolution of the template
    reg_target = pe.Node(niu.Function(function=_registration_target,
                                      output_names=['t1w_file', 'brain_mask']),
                         name='reg_target', run_without_submitting=True)
    reg_target.inputs.firsts = registration_spaces(templates)
    tunables = load_tunables()
    on_gpu = device == 'cuda'
    # through the T1w, the deformable step registers a T1w to the (T1w) template
    refine_options = _contrast_options(refine_options, 'T1w' if via_t1w else image_type,
                                       mode) if refine else refine_options
    registration = pe.Node(
        SynthMorphRegister(mode=mode, lam=lam, extent=extent, passes=passes, refine=refine,
                           device=device, use_gpu=on_gpu, num_threads=omp_nthreads,
                           **({'cache_dir': str(cache_dir)} if cache_dir else {}),
                           **({'weights': weights} if weights else {}),
                           **({'refine_options': refine_options} if refine_options else {})),
        name='registration', n_procs=omp_nthreads,
        mem_gb=tunables['mem_gb']['cuda' if on_gpu else 'cpu'],
    )
    workflow.connect([
        (inputnode, split_desc, [('template', 'template')]),
        (inputnode, reg_target, [('template', 'template')]),
        (inputnode, registration, [('moving_image', 'moving_image'),
                                   ('moving_mask', 'moving_mask'),
                                   ('lesion_mask', 'lesion_mask')]),
        (split_desc, tf_select, [('name', 'name'), ('spec', 'spec')]),
        (reg_target, registration, [('t1w_file', 'fixed_image')]),
        (tf_select, registration, [('t1w_file', 'reference_image')]),
        (split_desc, poutputnode, [('name', 'template'), ('spec', 'template_spec')]),
        (tf_select, poutputnode, [('t1w_file', 'template_file'),
                                  ('brain_mask', 'template_mask')]),
        (registration, poutputnode, [('forward_xfm', 'anat2std_xfm'),
                                     ('inverse_xfm', 'std2anat_xfm'),
                                     ('moved_image', 'std_image'),
                                     ('log_jacobian', 'log_jacobian'),
                                     ('metadata', 'metadata'),
                                     ('moved_lesion', 'std_lesion_mask')]),
        (poutputnode, outputnode, [(f, f) for f in out_fields]),
    ])  # fmt:skip
    if via_t1w:
        workflow.connect(inputnode, 'via_image', registration, 'via_image')
    if refine and (refine_options or {}).get('refine_weight', 'brain') == 'brain':
        # the template's own brain mask weights the refinement (the exact brain, cortex
        # included): mean Dice +0.007 on whole-head T1w pairs (benchmarks/README.md)
        workflow.connect(reg_target, 'brain_mask', registration, 'fixed_mask')
    return workflow


def _contrast_options(refine_options: dict | None, image_type: str, mode: str) -> dict:
    """``refine_options`` told what the moving image's BIDS suffix says (the templates are
    T1w): ``cross_contrast`` where it is missing or None (auto), and in the deformable modes
    MIND across contrasts where ``refine_metric`` is missing or ``'auto'``. Within one
    contrast ``auto`` stays: with ``cross_contrast`` False it keeps local NCC unless the
    intensities run opposite ways (an infant's T1w). The linear modes keep ``auto`` (there
    MIND, when ``auto`` picked it, aligned no worse)."""
    from ..utils.bids import T1_LIKE

    options = dict(refine_options or {})
    if options.get('cross_contrast') is None:
        options['cross_contrast'] = image_type not in T1_LIKE
    if mode in ('joint', 'deform') and options.get('refine_metric', 'auto') == 'auto':
        options['refine_metric'] = 'mind' if options['cross_contrast'] else 'auto'
    return options


def _mode_text(mode: str, lam: float, passes: int = 1) -> str:
    again = (f' The deformable network ran {passes} times, each time on the image the runs '
             f'before had moved, and the velocity fields were added.' if passes > 1 else '')
    if mode == 'joint':
        return (f'An affine network was followed by a deformable hypernetwork (regularisation '
                f'weight lambda = {lam}), whose symmetric stationary velocity field was '
                f'integrated into a diffeomorphism.{again}')
    if mode == 'deform':
        return f'A deformable hypernetwork (lambda = {lam}) registered the images.{again}'
    return f'The registration was {mode} ({"12" if mode == "affine" else "6"} degrees of freedom).'


def _refine_text(refine: int, refine_options: dict | None, mode: str = 'joint',
                 lam: float = 0.5) -> str:
    """The methods sentence of the test-time refinement (what produced the results, so the
    text a paper copies must name it)."""
    from ..engine.optimise import cross_contrast_lambda

    if not refine:
        return ''
    options = refine_options or {}
    weight = options.get('refine_weight', 'brain')
    where = {'brain': ", weighted by the template's brain mask",
             'head': ' over the whole head', 'none': ''}[weight]
    lncc = 'local normalised cross-correlation'
    mind = 'the agreement of MIND-SSC descriptors [@heinrich2013]'
    similarity = {'lncc': lncc, 'mind': mind}.get(
        options.get('refine_metric', 'auto'),
        f'{lncc} between images of one contrast, else {mind}')
    if mode in LINEAR_MODES:
        what = f'the {mode} transform'
    else:
        what = 'the affine transform, then the stationary velocity field'
        if options.get('cross_contrast') is not False and 0 < lam < 1:
            similarity += (f' (across contrasts with the smoothness weighed more: lambda '
                           f'{cross_contrast_lambda(lam):.2g})')
    return (f' The networks\' result was refined by test-time optimisation of {what}, coarse to '
            f'fine ({refine} iterations at the finest level), maximising {similarity}{where}.')


def _via_text(via_t1w: bool) -> str:
    if not via_t1w:
        return ''
    return (' The two transforms (rigid, then the T1w image\'s to the template) were composed '
            'into one, so that the image lands where the T1w image does.')


def _split_template(template):
    """``'MNI152NLin6Asym:res-2'`` -> ``('MNI152NLin6Asym', {'res': '2'})``."""
    from synthmorph_app.utils.templates import parse_output_spaces

    return parse_output_spaces([template])[0]


def registration_spaces(templates: list[str]) -> dict[str, str]:
    """``{space: the space it is registered to}``: the first listed resolution of its
    template (one registration per template, as its transform files are named).

    >>> registration_spaces(['MNI152NLin6Asym:res-2', 'MNI152NLin2009cAsym',
    ...                      'MNI152NLin6Asym:res-1'])['MNI152NLin6Asym:res-1']
    'MNI152NLin6Asym:res-2'
    >>> sorted(set(registration_spaces(['MNIInfant:cohort-1', 'MNIInfant:cohort-2']).values()))
    ['MNIInfant:cohort-1', 'MNIInfant:cohort-2']
    """
    from ..utils.templates import template_of

    firsts: dict[str, str] = {}
    for space in templates:
        firsts.setdefault(template_of(space), space)
    return {space: firsts[template_of(space)] for space in templates}


def _registration_target(template, firsts):
    """The head T1w and brain mask ``template`` is registered to (``firsts[template]``)."""
    from synthmorph_app.workflows.registration import (
        _select_template,
        _split_template,
    )

    return _select_template(*_split_template(firsts[template]))


def _select_template(name, spec):
    """The template's head T1w (at ``spec``'s resolution) and a brain mask, offline."""
    from synthmorph_app.errors import TemplateNotFoundError
    from synthmorph_app.utils.templates import get_template

    t1w = get_template(name, spec, suffix='T1w')
    try:
        mask = get_template(name, spec, suffix='mask', desc='brain')
    except TemplateNotFoundError:
        mask = get_template(name, {k: v for k, v in spec.items() if k != 'res'},
                            suffix='mask', desc='brain')
    return str(t1w), str(mask)
