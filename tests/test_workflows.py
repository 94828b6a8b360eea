"""Workflow factories: parametrized construction, and one real run of the registration
workflow spliced into a parent workflow by field name (as an fMRIPrep-like pipeline would)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault('NIPYPE_NO_ET', '1')

from synthmorph_app.utils.templates import setup_templateflow_home

setup_templateflow_home()

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from synthmorph_app.cli.bids import DEMO_DIR
from synthmorph_app.workflows.base import init_anat_image_wf, init_synthmorph_wf
from synthmorph_app.workflows.registration import (
    SMRIPREP_OUTPUTS,
    init_register_template_wf,
)
from synthmorph_app.workflows.settings import RegistrationSettings

T1W = DEMO_DIR / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz'


@pytest.mark.parametrize('templates', [['MNI152NLin6Asym:res-2'],
                                       ['MNI152NLin6Asym:res-2', 'MNI152NLin6Asym:res-1']])
@pytest.mark.parametrize('mode', ['joint', 'affine', 'rigid', 'deform'])
def test_register_template_wf_ports(templates, mode):
    wf = init_register_template_wf(templates=templates, mode=mode)
    inputs = wf.get_node('inputnode').inputs.copyable_trait_names()
    assert {'moving_image', 'moving_mask', 'lesion_mask', 'template'} <= set(inputs)
    assert wf.get_node('inputnode').iterables == [('template', templates)]
    for node in ('poutputnode', 'outputnode'):
        outputs = wf.get_node(node).outputs.copyable_trait_names()
        assert set(SMRIPREP_OUTPUTS) <= set(outputs)
    assert 'SynthMorph' in wf.__desc__ and mode in wf.__desc__ or mode == 'joint'
    assert wf.get_node('registration').interface.inputs.mode == mode


@pytest.mark.parametrize('image_type, given, told', [
    ('T1w', 'missing', False), ('FLAIR', 'missing', True), ('T2w', None, True),
    ('FLAIR', False, False), ('T1w', True, True), ('UNIT1', 'missing', False),
    ('UNIT1', None, False), ('inplaneT1', 'missing', False), ('PDw', 'missing', True)])
def test_templates_are_t1w_so_the_suffix_tells_the_contrasts(image_type, given, told):
    options = {'refine_metric': 'auto'} | ({} if given == 'missing' else
                                           {'cross_contrast': given})
    wf = init_register_template_wf(templates=['MNI152NLin6Asym:res-2'], refine=5,
                                   refine_options=options, image_type=image_type)
    passed = wf.get_node('registration').interface.inputs.refine_options
    # against the T1w templates the suffix tells the metric: MIND across contrasts; within one
    # 'auto' stays, which with cross_contrast False keeps local NCC unless the intensities run
    # opposite ways (an infant's T1w)
    metric = 'mind' if told else 'auto'
    assert passed == {'refine_metric': metric, 'cross_contrast': told}


@pytest.mark.parametrize('image_type, mode, given, metric', [
    ('T1w', 'joint', 'mind', 'mind'), ('T1w', 'deform', 'lncc', 'lncc'),
    ('T1w', 'deform', 'auto', 'auto'), ('T1w', 'affine', 'auto', 'auto'),
    ('T1w', 'rigid', 'auto', 'auto'), ('FLAIR', 'joint', 'auto', 'mind'),
    ('FLAIR', 'deform', 'lncc', 'lncc'), ('FLAIR', 'joint', 'mind', 'mind'),
    ('FLAIR', 'affine', 'auto', 'auto'), ('FLAIR', 'rigid', 'auto', 'auto')])
def test_the_suffix_picks_the_metric_in_deformable_modes_unless_told(image_type, mode, given,
                                                                     metric):
    # MIND for another contrast; a T1w keeps auto (local NCC unless inverted); so do the
    # linear modes
    wf = init_register_template_wf(templates=['MNI152NLin6Asym:res-2'], mode=mode, refine=5,
                                   refine_options={'refine_metric': given},
                                   image_type=image_type)
    passed = wf.get_node('registration').interface.inputs.refine_options
    assert passed == {'refine_metric': metric, 'cross_contrast': image_type != 'T1w'}


@pytest.mark.parametrize('device, gpu', [('cpu', False), ('cuda', True)])
def test_gpu_nodes_say_so(device, gpu):
    wf = init_register_template_wf(templates=['MNI152NLin6Asym:res-2'], device=device,
                                   omp_nthreads=3)
    node = wf.get_node('registration')
    assert node.is_gpu_node() is gpu
    assert node.n_procs == 3 and node.mem_gb > 0


def test_settings_reach_the_registration_node():
    settings = RegistrationSettings(lam=0.3, passes=2, refine=4)
    wf = init_register_template_wf(templates=['MNI152NLin6Asym:res-2'],
                                   **settings.register_kwargs())
    inputs = wf.get_node('registration').interface.inputs
    assert (inputs.lam, inputs.passes, inputs.refine) == (0.3, 2, 4)
    assert 'deformable network ran 2 times' in wf.__desc__  # the methods text says so
    one = init_register_template_wf(templates=['MNI152NLin6Asym:res-2'])
    assert 'deformable network ran' not in one.__desc__


@pytest.mark.parametrize('refine, options, connected', [
    (5, None, True), (5, {'refine_weight': 'brain'}, True), (5, {'refine_weight': 'head'}, False),
    (0, None, False)])
def test_the_template_brain_mask_weights_the_refinement(refine, options, connected):
    """With the default weight the template's own brain mask replaces our rough estimate for
    the template; a weight the user asked for, or no refinement, leaves it out."""
    wf = init_register_template_wf(templates=['MNI152NLin6Asym:res-2'], refine=refine,
                                   refine_options=options)
    into = {(u.name, d) for u, v, data in wf._graph.edges(data=True) if v.name == 'registration'
            for _, d in data['connect']}
    # the mask of the template registered to (the first listed resolution of it)
    assert (('reg_target', 'fixed_mask') in into) == connected
    assert ('reg_target', 'fixed_image') in into and ('tf_select', 'reference_image') in into
    assert ('inputnode', 'moving_mask') in into
    assert ("template's brain mask" in wf.__desc__) == connected


def test_app_workflow_builds(tmp_path):
    plan = {'01': [(str(T1W), ['MNI152NLin6Asym:res-2'])],
            '02': [(str(DEMO_DIR / 'sub-02' / 'anat' / 'sub-02_T1w.nii.gz'),
                    ['MNI152NLin6Asym:res-2'])]}
    wf = init_synthmorph_wf(plan=plan, out_dir=str(tmp_path), bids_dir=str(DEMO_DIR))
    assert min(wf.list_node_names()).startswith('sub_01_wf.anat_sub01_T1w_wf')
    assert 'SynthMorph' in wf.visit_desc()
    image_wf = init_anat_image_wf(in_file=str(T1W), templates=['MNI152NLin6Asym:res-2'],
                                  out_dir=str(tmp_path), bids_dir=str(DEMO_DIR))
    assert image_wf.name == 'anat_sub01_T1w_wf'


@pytest.mark.slow
def test_register_template_wf_in_parent(tmp_path):
    """Splice the workflow into a parent by sMRIPrep's field names, and run it."""
    parent = pe.Workflow(name='parent', base_dir=str(tmp_path))
    src = pe.Node(niu.IdentityInterface(fields=['t1w_preproc']), name='src')
    src.inputs.t1w_preproc = str(T1W)
    reg = init_register_template_wf(templates=['MNI152NLin6Asym:res-2'], mode='affine',
                                    extent=192, refine=2)
    sink = pe.Node(niu.Function(function=_check, input_names=['anat2std_xfm', 'std2anat_xfm',
                                                              'template', 'template_spec',
                                                              'metadata'],
                                output_names=['ok']), name='sink')
    parent.connect([
        (src, reg, [('t1w_preproc', 'inputnode.moving_image')]),
        (reg, sink, [('outputnode.anat2std_xfm', 'anat2std_xfm'),
                     ('outputnode.std2anat_xfm', 'std2anat_xfm'),
                     ('outputnode.template', 'template'),
                     ('outputnode.template_spec', 'template_spec'),
                     ('outputnode.metadata', 'metadata')]),
    ])  # fmt:skip
    parent.config['execution'].update(crashdump_dir=str(tmp_path), poll_sleep_duration=0.05)
    graph = parent.run(plugin='Linear')
    node = next(n for n in graph.nodes() if n.name == 'sink')
    assert node.result.outputs.ok == 'MNI152NLin6Asym'


def _check(anat2std_xfm, std2anat_xfm, template, template_spec, metadata):
    from pathlib import Path

    if metadata[0]['refine']['masks'] != ['fixed']:  # the template's brain mask weighed it
        raise ValueError(metadata)
    for xfm in anat2std_xfm + std2anat_xfm:
        if not Path(xfm).is_file() or not xfm.endswith('.h5'):
            raise ValueError(xfm)
    if template_spec != [{'res': '2'}]:
        raise ValueError(template_spec)
    return template[0]


@pytest.mark.slow
def test_an_infant_like_t1w_gets_what_the_bids_app_passes_a_t1w(shared_data):
    """The options the BIDS-App passes a T1w in joint mode register an intensity-inverted copy
    of a real T1w, shrunk to 0.75 of its size (an infant's T1w: grey and white matter swapped)
    where the adult original lands, shrunk alike. Forcing local NCC for every T1w put it 67-71
    mm away; 'auto' with one contrast expected takes MIND for it and keeps local NCC for adults
    (the affine part: about 1.6 mm)."""
    import nibabel as nb
    import numpy as np

    from synthmorph_app.engine.register import register
    from synthmorph_app.io.images import load_image
    from synthmorph_app.workflows.registration import _contrast_options

    options = _contrast_options({}, 'T1w', 'joint')
    t1w = load_image(shared_data / 'bids' / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz')
    tpl = shared_data / 'templateflow' / 'tpl-MNI152NLin6Asym'
    template = load_image(tpl / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz')
    mask = nb.load(tpl / 'tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz')
    data = t1w.get_fdata(dtype=np.float32)
    bright = np.percentile(data, 99)
    centre = nb.affines.apply_affine(t1w.affine, np.argwhere(data > 0.2 * bright)).mean(0)
    shrink = np.diag([0.75, 0.75, 0.75, 1.0])
    shrink[:3, 3] = 0.25 * centre
    infant = nb.Nifti1Image(np.where(data > 0.05 * bright, data.max() - data, 0),
                            shrink @ t1w.affine)
    run = {'mode': 'joint', 'refine': 2, 'refine_levels': (8.0,), 'fixed_mask': mask, **options}
    points = nb.affines.apply_affine(mask.affine, np.argwhere(mask.get_fdata() > 0)[::200])
    adult = register(t1w, template, **run)
    found = register(infant, template, **run)
    assert found.info['refine']['deformable']['metric'] == 'mind'
    assert adult.info['refine']['deformable']['metric'] == 'lncc'
    truth = nb.affines.apply_affine(shrink @ adult.forward.affine, points)
    gap = np.linalg.norm(nb.affines.apply_affine(found.forward.affine, points) - truth, axis=1)
    assert gap.mean() < 4.0, gap.mean()
