"""The embedding example (``workflows/embedding/anat_pipeline.py``): an fMRIPrep-like anatomical
workflow with ``init_register_template_wf`` spliced in next to other nodes.

It runs for real on the packaged demo dataset, through its command line as a user runs it; its
outputs must be where fMRIPrep's ``--derivatives`` queries look (sMRIPrep's ``io_spec.json``
entities), on the right grids, and consistent with the registration node's own resampling.
Swapping the registration sub-workflow with niworkflows' splicer is checked on the graph.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

os.environ.setdefault('NIPYPE_NO_ET', '1')

from synthmorph_app.cli.bids import DEMO_DIR
from synthmorph_app.utils.templates import setup_templateflow_home

setup_templateflow_home()

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / 'workflows' / 'embedding' / 'anat_pipeline.py'
TEMPLATE = 'MNI152NLin6Asym'


def _example():
    if 'anat_pipeline' not in sys.modules:  # registered, so Nipype can pickle its classes
        spec = importlib.util.spec_from_file_location('anat_pipeline', EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules['anat_pipeline'] = module
        spec.loader.exec_module(module)
    return sys.modules['anat_pipeline']


@pytest.fixture(scope='module')
def example_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('embedding')
    out, work = tmp / 'out', tmp / 'work'
    env = {**os.environ, 'NIPYPE_NO_ET': '1', 'MPLCONFIGDIR': str(tmp / 'mpl'),
           'TMPDIR': str(tmp)}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), str(DEMO_DIR), str(out), '--participant-label', '01',
         '--output-spaces', f'{TEMPLATE}:res-2', '--extent', '192', '-w', str(work)],
        env=env, capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, work, proc


@pytest.mark.slow
def test_example_writes_fmriprep_derivatives(example_run):
    out, _, proc = example_run
    anat = out / 'sub-01' / 'anat'
    assert sorted(p.name for p in anat.glob('*.nii.gz')) + sorted(
        p.name for p in anat.glob('*.h5')) == [
        'sub-01_desc-brain_mask.nii.gz',
        'sub-01_desc-preproc_T1w.nii.gz',
        f'sub-01_space-{TEMPLATE}_res-2_desc-preproc_T1w.nii.gz',
        f'sub-01_from-{TEMPLATE}_to-T1w_mode-image_xfm.h5',
        f'sub-01_from-T1w_to-{TEMPLATE}_mode-image_xfm.h5',
    ]
    assert 'SynthMorph' in proc.stdout  # the methods text of the spliced workflow
    # fMRIPrep finds the transforms with sMRIPrep's io_spec.json queries
    from bids.layout import BIDSLayout

    layout = BIDSLayout(out, validate=False, config=['bids', 'derivatives'])
    query = {'subject': '01', 'datatype': 'anat', 'suffix': 'xfm', 'mode': 'image',
             'extension': ['.h5', '.txt']}
    forward = layout.get(**query, to=TEMPLATE, **{'from': 'T1w'}, return_type='file')
    reverse = layout.get(**query, to='T1w', **{'from': TEMPLATE}, return_type='file')
    assert len(forward) == 1 and len(reverse) == 1
    preproc = layout.get(subject='01', desc='preproc', suffix='T1w', space=None,
                         extension='.nii.gz', return_type='file')
    assert len(preproc) == 1


@pytest.mark.slow
def test_example_outputs_on_the_right_grids(example_run):
    out, work, _ = example_run
    from synthmorph_app.io.transforms import load_transform
    from synthmorph_app.utils.templates import get_template

    anat = out / 'sub-01' / 'anat'
    template = nb.load(get_template(TEMPLATE, {'res': '2'}))
    t1w = nb.load(anat / 'sub-01_desc-preproc_T1w.nii.gz')
    std = nb.load(anat / f'sub-01_space-{TEMPLATE}_res-2_desc-preproc_T1w.nii.gz')
    mask = nb.load(anat / 'sub-01_desc-brain_mask.nii.gz')
    assert std.shape == template.shape and np.allclose(std.affine, template.affine, atol=1e-4)
    assert mask.shape == t1w.shape and np.allclose(mask.affine, t1w.affine, atol=1e-4)
    assert set(np.unique(np.asanyarray(mask.dataobj))) == {0, 1}
    assert np.asanyarray(mask.dataobj).sum() > 1000  # the template's brain landed somewhere
    for name in (f'sub-01_from-T1w_to-{TEMPLATE}_mode-image_xfm.h5',
                 f'sub-01_from-{TEMPLATE}_to-T1w_mode-image_xfm.h5'):
        load_transform(anat / name)
    # resampling through the written transform (another node) matches the registration node's
    moved = next(work.rglob('registration/moved.nii.gz'))
    np.testing.assert_allclose(np.asanyarray(std.dataobj, dtype='float32'),
                               nb.load(moved).get_fdata(dtype='float32'), atol=1e-3)


def test_splice_registration_swaps_the_tagged_workflow(tmp_path):
    example = _example()
    from synthmorph_app.workflows.registration import init_register_template_wf

    t1w = str(DEMO_DIR / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz')
    wf = example.init_anat_preproc_wf(t1w=t1w, output_dir=str(tmp_path),
                                      templates=[f'{TEMPLATE}:res-2'])
    before = {e: d['connect'] for e, d in
              ((edge, wf._graph.get_edge_data(*edge)) for edge in wf._graph.edges)}
    replacement = init_register_template_wf(templates=[f'{TEMPLATE}:res-2'], mode='affine')
    example.splice_registration(wf, replacement)
    assert replacement in wf._graph.nodes
    registration = [n for n in wf._get_all_nodes() if n.name == 'registration']
    assert len(registration) == 1 and registration[0].interface.inputs.mode == 'affine'
    # every connection to and from the old workflow now goes to the replacement, unchanged
    after = {(a.name, b.name): d['connect'] for a, b, d in wf._graph.edges(data=True)}
    assert sorted(after.values(), key=str) == sorted(before.values(), key=str)
    assert after[('clip', 'register_template_wf')] == [('out_file', 'inputnode.moving_image')]
    assert ('poutputnode.anat2std_xfm', 'in_file') in after[('register_template_wf',
                                                             'ds_anat2std_xfm')]
    wf._create_flat_graph()  # Nipype accepts the spliced graph
