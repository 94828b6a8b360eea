"""Interfaces: wiring of SynthMorphRegister/Apply, ImageQC and the atomic derivatives sink."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

os.environ.setdefault('NIPYPE_NO_ET', '1')

from synthmorph_app.cli.bids import DEMO_DIR
from synthmorph_app.interfaces.derivatives import (
    DerivativesSink,
    derivative_paths,
    is_complete,
    sidecar,
)
from synthmorph_app.interfaces.reports import ImageQC
from synthmorph_app.interfaces.synthmorph import SynthMorphApply, SynthMorphRegister
from synthmorph_app.utils.templates import PACKAGED_HOME

T1W = DEMO_DIR / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz'
TPL = PACKAGED_HOME / 'tpl-MNI152NLin6Asym' / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz'
MASK = PACKAGED_HOME / 'tpl-MNI152NLin6Asym' / 'tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz'


@pytest.fixture(scope='module')
def registered(tmp_path_factory):
    cwd = tmp_path_factory.mktemp('reg')
    old = os.getcwd()
    os.chdir(cwd)
    try:
        res = SynthMorphRegister(moving_image=str(T1W), fixed_image=str(TPL), mode='joint',
                                 extent=192, num_threads=2, refine=2, fixed_mask=str(MASK),
                                 refine_options={'cross_contrast': True}).run()
    finally:
        os.chdir(old)
    return res.outputs


@pytest.mark.slow
def test_register_outputs(registered):
    moved = nb.load(registered.moved_image)
    tpl = nb.load(str(TPL))
    assert moved.shape == tpl.shape and np.allclose(moved.affine, tpl.affine)
    assert registered.forward_xfm.endswith('.h5') and registered.inverse_xfm.endswith('.h5')
    assert nb.load(registered.log_jacobian).shape == tpl.shape
    meta = registered.metadata
    assert meta['mode'] == 'joint' and set(meta['models']) == {'affine', 'deform'}
    assert meta['timings']['total'] > 0
    # told the contrasts differ, the deformable refinement ran at the raised lambda
    assert meta['refine']['iterations'] == 2 and meta['refine']['cross_contrast'] is True
    assert meta['refine']['masks'] == ['fixed']  # the template's mask weighed the refinement
    used = meta['refine']['deformable']
    assert used['cross_contrast'] is True and used['lambda'] == pytest.approx(0.7)
    assert used['metric'] in ('lncc', 'mind')


@pytest.mark.slow
def test_apply_reproduces_moved_image(registered, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = SynthMorphApply(in_file=str(T1W), transform=registered.forward_xfm,
                          reference_image=str(TPL)).run()
    ours = np.asanyarray(nb.load(registered.moved_image).dataobj, dtype=float)
    again = np.asanyarray(nb.load(res.outputs.out_file).dataobj, dtype=float)
    assert np.abs(ours - again).max() <= 1e-3 * (ours.max() - ours.min()) + 1


@pytest.mark.slow
def test_qc_and_sink(registered, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    qc = ImageQC(moving_image=str(T1W), moved_image=registered.moved_image, template=str(TPL),
                 template_mask=str(MASK), log_jacobian=registered.log_jacobian).run().outputs
    assert set(qc.qc) == {'mind_ncc', 'ncc', 'logjac_sd', 'folding_pct'}
    assert Path(qc.before_after).read_text().lstrip().startswith('<')
    out = tmp_path / 'deriv'
    spec = {'res': '2'}
    assert not is_complete(out, T1W, 'MNI152NLin6Asym', spec)
    res = DerivativesSink(
        out_dir=str(out), bids_dir=str(DEMO_DIR), in_file=str(T1W), template='MNI152NLin6Asym',
        template_spec=spec, template_file=str(TPL), template_mask=str(MASK),
        space_image=registered.moved_image,
        forward_xfm=registered.forward_xfm, inverse_xfm=registered.inverse_xfm,
        before_after=qc.before_after, jacobian_figure=qc.jacobian_figure,
        metadata=registered.metadata, qc=qc.qc, command_line='synthmorph-app test',
    ).run()
    assert res.outputs.done and is_complete(out, T1W, 'MNI152NLin6Asym', spec)
    paths = derivative_paths(out, T1W, 'MNI152NLin6Asym', spec)
    assert all(p.is_file() for p in paths.values())
    meta = json.loads(paths['forward_xfm'].with_suffix('.json').read_text())
    assert meta['Sources'][0] == 'bids:raw:sub-01/anat/sub-01_T1w.nii.gz'
    assert [Path(s).name for s in meta['Sources'][1:]] == [TPL.name, MASK.name]
    assert meta['CommandLine'] == 'synthmorph-app test' and meta['QC'] == qc.qc
    assert meta['Refinement'] == registered.metadata['refine'] and meta['Lambda'] == 0.5
    assert not list(out.glob('**/.*.tmp'))


def test_sink_interrupted_leaves_nothing_complete(tmp_path):
    """A missing input makes the copy fail: no temporary files, and not complete."""
    out = tmp_path / 'deriv'
    files = {'space_image': str(T1W), 'forward_xfm': str(tmp_path / 'missing.h5'),
             'inverse_xfm': str(T1W)}
    from synthmorph_app.interfaces.derivatives import save_derivatives

    with pytest.raises(FileNotFoundError):
        save_derivatives(out, DEMO_DIR, T1W, 'MNI152NLin6Asym', {'res': '2'}, files,
                         metadata={}, qc={})
    assert not is_complete(out, T1W, 'MNI152NLin6Asym', {'res': '2'})
    assert not [p for p in out.glob('**/*') if p.is_file()]


@pytest.mark.parametrize('cleared', [None, {'moving': 0.61}])
def test_sidecars_say_when_a_noise_background_was_cleared(tmp_path, cleared):
    """An MP2RAGE-like background of noise set to 0 before registering is provenance: the
    sidecars say so (with the share of the voxels), and say nothing otherwise."""
    from synthmorph_app.interfaces.derivatives import save_derivatives

    files = {key: str(T1W) for key in ('space_image', 'forward_xfm', 'inverse_xfm')}
    metadata = {'mode': 'joint'} | ({'noise_background_cleared': cleared} if cleared else {})
    save_derivatives(tmp_path, DEMO_DIR, T1W, 'MNI152NLin6Asym', {'res': '2'}, files,
                     metadata=metadata, qc={})
    paths = derivative_paths(tmp_path, T1W, 'MNI152NLin6Asym', {'res': '2'})
    for key in ('space_image', 'forward_xfm'):
        meta = json.loads(sidecar(paths[key]).read_text())
        assert meta.get('NoiseBackgroundCleared') == cleared


def test_a_set_made_with_other_settings_is_redone_and_keeps_only_its_own_files(tmp_path):
    """The sidecars record the settings that decided a registration; a run that asks for
    other ones does not count the set as complete, and the set written again keeps no file
    of the old one (an LTA of the other mode, a figure no longer made)."""
    from synthmorph_app.interfaces.derivatives import (
        recorded_settings,
        save_derivatives,
        settings_changes,
    )
    from synthmorph_app.workflows.settings import RegistrationSettings

    spec, tpl = {'res': '2'}, 'MNI152NLin6Asym'
    kinds = ('space_image', 'forward_xfm', 'inverse_xfm', 'forward_lta', 'inverse_lta')
    files = {key: str(T1W) for key in kinds}
    affine = RegistrationSettings(mode='affine', refine=15).signature()
    save_derivatives(tmp_path, DEMO_DIR, T1W, tpl, spec, files | {'before_after': str(TPL)},
                     metadata={'mode': 'affine'}, qc={}, registration_settings=affine)
    old = derivative_paths(tmp_path, T1W, tpl, spec, lta_mode='affine')
    assert all(old[k].is_file() for k in (*kinds, 'before_after'))
    assert is_complete(tmp_path, T1W, tpl, spec, lta_mode='affine', settings=affine)
    # device and threads are not settings of the registration, nor lambda of an affine one
    same = RegistrationSettings(mode='affine', refine=15, device='cuda', omp_nthreads=8,
                                lam=0.9)
    assert is_complete(tmp_path, T1W, tpl, spec, lta_mode='affine',
                       settings=same.signature())
    joint = RegistrationSettings(mode='joint', lam=0.3, refine=15).signature()
    assert not is_complete(tmp_path, T1W, tpl, spec, lta_mode='affine', settings=joint)
    assert settings_changes(recorded_settings(tmp_path, T1W, tpl, spec), joint) == {
        'mode': ('affine', 'joint')}
    # the deformable levels left to the engine are recorded as its default, so that a set
    # made under another default (null: 8,4,2 before session 36) is redone
    assert joint['refine_levels'] == [8.0, 4.0, 2.0, 1.5]
    assert settings_changes(dict(joint, refine_levels=None), joint) == {
        'refine_levels': (None, [8.0, 4.0, 2.0, 1.5])}
    chosen = RegistrationSettings(mode='joint', lam=0.3, refine=15,
                                  refine_options={'refine_levels': (8.0, 4.0, 2.0)})
    assert chosen.signature()['refine_levels'] == [8.0, 4.0, 2.0]
    # without refinement the levels decide nothing
    assert RegistrationSettings(mode='joint', refine=0).signature()['refine_levels'] is None
    # the BIDS-App plans (and compares signatures) without loading torch
    probe = ('import sys; from synthmorph_app.workflows.settings import RegistrationSettings; '
             "RegistrationSettings(mode='joint', refine=15).signature(); "
             "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, '-c', probe], check=True)

    save_derivatives(tmp_path, DEMO_DIR, T1W, tpl, spec, files, metadata={'mode': 'joint'},
                     qc={}, registration_settings=joint)
    new = derivative_paths(tmp_path, T1W, tpl, spec, lta_mode='joint')
    assert all(new[k].is_file() for k in kinds)
    assert new['forward_lta'].name.endswith('_desc-linear_xfm.lta')
    assert not old['forward_lta'].exists() and not old['inverse_lta'].exists()
    assert not old['before_after'].exists()
    assert is_complete(tmp_path, T1W, tpl, spec, lta_mode='joint', settings=joint)
    meta = json.loads(sidecar(new['forward_xfm']).read_text())
    assert meta['RegistrationSettings'] == joint and meta['RegistrationMode'] == 'joint'

    # a set whose sidecars predate the record is not redone for settings it cannot tell
    save_derivatives(tmp_path, DEMO_DIR, T1W, tpl, spec, files, metadata={'mode': 'joint'},
                     qc={})
    assert recorded_settings(tmp_path, T1W, tpl, spec) is None
    assert is_complete(tmp_path, T1W, tpl, spec, lta_mode='joint', settings=affine)


def test_cohorts_of_one_template_get_transforms_of_their_own(tmp_path):
    """MNIInfant:cohort-1 and :cohort-2 are two templates (two ages): their transforms were
    named ``to-MNIInfant`` both; now as NiBabies names them, ``to-MNIInfant+1``. Resolutions of
    one template share one registration, cohorts do not."""
    from synthmorph_app.workflows.registration import registration_spaces

    one = derivative_paths(tmp_path, T1W, 'MNIInfant', {'cohort': '1', 'res': '1'})
    two = derivative_paths(tmp_path, T1W, 'MNIInfant', {'cohort': '2', 'res': '1'})
    assert one['forward_xfm'].name == 'sub-01_from-T1w_to-MNIInfant+1_mode-image_xfm.h5'
    assert two['inverse_xfm'].name == 'sub-01_from-MNIInfant+2_to-T1w_mode-image_xfm.h5'
    assert one['space_image'].name == 'sub-01_space-MNIInfant_cohort-1_res-1_T1w.nii.gz'
    spaces = ['MNIInfant:cohort-1:res-2', 'MNIInfant:cohort-2:res-1', 'MNIInfant:cohort-1:res-1']
    assert registration_spaces(spaces) == {
        'MNIInfant:cohort-1:res-2': 'MNIInfant:cohort-1:res-2',
        'MNIInfant:cohort-2:res-1': 'MNIInfant:cohort-2:res-1',
        'MNIInfant:cohort-1:res-1': 'MNIInfant:cohort-1:res-2'}


def test_warnings_reach_the_sidecars_and_the_reports(tmp_path):
    """What the engine warns about an image (here a field of view smaller than a head: voxel
    sizes a fifth of the truth) is kept with its derivatives, also when the registration
    comes from the cache: the sidecars, the subject report and the group QC show it (it was
    only printed, among the lines of every other subject)."""
    from synthmorph_app.interfaces.derivatives import save_derivatives
    from synthmorph_app.interfaces.synthmorph import register_files
    from synthmorph_app.reports.group import write_group_report
    from synthmorph_app.reports.subject import write_subject_report

    img = nb.load(str(T1W))
    bids = tmp_path / 'bids'
    small = bids / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz'
    small.parent.mkdir(parents=True)
    (bids / 'dataset_description.json').write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    nb.save(nb.Nifti1Image(np.asanyarray(img.dataobj), np.diag([0.2] * 3 + [1]) @ img.affine),
            str(small))
    runs = []
    for run in ('computed', 'cached'):
        work = tmp_path / run
        runs.append(register_files(
            small, TPL, forward_xfm=work / 'fwd.h5', inverse_xfm=work / 'inv.h5',
            moved_image=work / 'moved.nii.gz', mode='rigid', refine=0, extent=192,
            cache_dir=tmp_path / 'cache'))
    assert runs[1]['metadata']['cache'] == 'read'
    for out in runs:
        warned = out['metadata']['warnings']
        assert len(warned) == 1 and 'less than a head' in warned[0] and str(small) in warned[0]
    out = tmp_path / 'deriv'
    files = {'space_image': runs[1]['moved_image'], 'forward_xfm': runs[1]['forward_xfm'],
             'inverse_xfm': runs[1]['inverse_xfm']}
    save_derivatives(out, bids, small, 'MNI152NLin6Asym', {'res': '2'}, files,
                     metadata=runs[1]['metadata'], qc={})
    paths = derivative_paths(out, small, 'MNI152NLin6Asym', {'res': '2'})
    for key in ('space_image', 'forward_xfm'):
        assert json.loads(sidecar(paths[key]).read_text())['Warnings'] == warned
    page = write_subject_report(out, '01').read_text()
    assert 'Warnings' in page and 'less than a head' in page
    tsv, html = write_group_report(out)
    header, row = tsv.read_text().splitlines()
    assert dict(zip(header.split('\t'), row.split('\t')))['warnings'] == '1'
    assert 'less than a head' in html.read_text()


def test_input_records_trust_an_unchanged_file_and_read_a_changed_one(tmp_path):
    """A rerun over a large dataset must not read every image again to learn that nothing
    changed: a file of the recorded size and modification time keeps its recorded checksum;
    one written since is read."""
    import hashlib

    from synthmorph_app.utils.bids import input_checksums, input_records

    image = tmp_path / 'sub-01_T1w.nii.gz'
    image.write_bytes(b'first scan')
    record = input_records(image)[image.name]
    assert record['sha256'] == hashlib.sha256(b'first scan').hexdigest()
    known = {image.name: {**record, 'sha256': 'as recorded'}}
    assert input_checksums(image, known=known) == {image.name: 'as recorded'}  # not read
    image.write_bytes(b'a rescan!!')  # the same size
    os.utime(image, ns=(record['mtime_ns'] + 10**9,) * 2)
    assert input_checksums(image, known=known) == {
        image.name: hashlib.sha256(b'a rescan!!').hexdigest()}


def test_a_first_plan_reads_no_image(tmp_path, monkeypatch):
    """Planning a first run over a large dataset must not read every image (nothing recorded
    to compare with); where the sidecars record checksums, the plan compares them."""
    from types import SimpleNamespace

    import synthmorph_app.utils.bids as bids_utils
    from synthmorph_app.cli.bids import _signature
    from synthmorph_app.interfaces.derivatives import forward_sidecar, save_derivatives
    from synthmorph_app.workflows.settings import RegistrationSettings

    settings, args = RegistrationSettings(), SimpleNamespace(via_t1w=False)
    space = ('MNI152NLin6Asym', {'res': '2'})
    read = []
    real = bids_utils._sha256_of
    monkeypatch.setattr(bids_utils, '_sha256_of', lambda *a: read.append(a[0]) or real(*a))
    first = _signature(settings, T1W, args, forward_sidecar(tmp_path, T1W, *space))
    assert 'inputs' not in first and not read
    files = {key: str(T1W) for key in ('space_image', 'forward_xfm', 'inverse_xfm')}
    records = bids_utils.input_records(T1W)
    save_derivatives(tmp_path, DEMO_DIR, T1W, *space, files, metadata={'mode': 'joint'}, qc={},
                     registration_settings=settings.signature(inputs={
                         n: r['sha256'] for n, r in records.items()}), input_files=records)
    read.clear()
    signature = _signature(settings, T1W, args, forward_sidecar(tmp_path, T1W, *space))
    assert signature['inputs'] == {T1W.name: records[T1W.name]['sha256']}
    assert not read  # unchanged since it was recorded: trusted, not read again


@pytest.mark.slow
def test_registration_nodes_run_in_workers_of_the_gpu_fork_server(tmp_path):
    """A ``--device cuda`` run's MultiProc workers come from a fork server that imported our
    nodes (workers forked after torch touched CUDA cannot use it: every registration of the
    first run on an H200 failed so). The same workers, pickled nodes and preloaded module,
    here on the CPU, in a real Nipype MultiProc run."""
    from nipype.pipeline import engine as pe

    from synthmorph_app.cli.bids import CUDA_MP_CONTEXT, _prepare_worker_start

    _prepare_worker_start('WARNING')
    assert CUDA_MP_CONTEXT == 'forkserver'
    assert os.environ['SYNTHMORPH_NIPYPE_LEVEL'] == 'WARNING'  # what the workers apply
    node = pe.Node(SynthMorphRegister(moving_image=str(T1W), fixed_image=str(TPL),
                                      mode='affine', refine=0, extent=192), name='registration')
    wf = pe.Workflow(name='gpu_workers', base_dir=str(tmp_path))
    wf.add_nodes([node])
    graph = wf.run(plugin='MultiProc',
                   plugin_args={'n_procs': 2, 'mp_context': CUDA_MP_CONTEXT})
    (done,) = graph.nodes()
    assert Path(done.result.outputs.forward_xfm).exists()
    assert done.result.outputs.metadata['mode'] == 'affine'
    # what the fork server imports first sets the run's Nipype level in its workers
    import subprocess
    import sys

    code = ('import logging, synthmorph_app.cli.workers; '
            "print(logging.getLogger('nipype.workflow').level)")
    env = dict(os.environ, SYNTHMORPH_NIPYPE_LEVEL='ERROR')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(40)]


def test_the_gpu_slot_warning_of_nipype_is_dropped():
    """Nipype counts a GPU node's CPU threads as GPU slots and warns on every run with more
    than one thread per registration; the registrations take the GPU one at a time, as meant."""
    import logging

    from synthmorph_app.cli.bids import ONE_GPU_SLOT

    def record(msg, *args):
        return logging.LogRecord('nipype.workflow', logging.WARNING, __file__, 1, msg, args, None)

    assert not ONE_GPU_SLOT.filter(record('Nodes demand more GPU than allowed (%d).', 1))
    assert ONE_GPU_SLOT.filter(record('Nodes demand more memory than allowed (%0.2f).', 2.0))
