"""The BIDS-App end to end: derivatives, provenance, failures, reruns, concurrency, exit codes.

Runs go through the real CLI in subprocesses (as users run it), on 2 mm data, with ``HOME``
unwritable and ``TEMPLATEFLOW_HOME`` unset, so the packaged template must serve.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from synthmorph_app.cli.bids import DEMO_DIR

TEMPLATE = (Path(__file__).resolve().parents[1] / 'synthmorph_app' / 'data' / 'templateflow'
            / 'tpl-MNI152NLin6Asym' / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz')
FAST = ['--extent', '192', '--nprocs', '2', '--omp-nthreads', '1']


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ('TEMPLATEFLOW_HOME', 'XDG_CACHE_HOME', 'SYNTHMORPH_WEIGHTS_DIR')}
    # /proc refuses new folders even to root: a HOME nothing can be written under
    env.update(HOME='/proc/synthmorph-no-home', NIPYPE_NO_ET='1', SYNTHMORPH_POLL_SLEEP='0.05',
               MPLCONFIGDIR=str(tmp / 'mpl'), TMPDIR=str(tmp))
    return env


def _run(args, tmp: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'synthmorph_app', *map(str, args)],
                          env=_env(tmp), capture_output=True, check=False, text=True, timeout=600, **kwargs)


@pytest.fixture(scope='module')
def main_run(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('bidsapp')
    out = tmp / 'out'
    proc = _run([shared_data / 'bids', out, 'participant', '--participant-label', '01',
                 'chris', '-w', tmp / 'work', *FAST], tmp)
    return proc, out, tmp


@pytest.mark.slow
def test_participant_derivatives(main_run, shared_data):
    proc, out, _ = main_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'report:' in proc.stdout
    # where it runs, said before it starts (--nprocs 2 --omp-nthreads 1, 2 images)
    assert 'registering on 2 CPU(s), 2 image(s) at a time with 1 thread(s) each' in proc.stdout
    for sub in ('01', 'chris'):  # progress as each job ends, numbered over the run's 2 jobs
        assert f'/2] sub-{sub}_T1w.nii.gz -> MNI152NLin6Asym:res-2: registered in ' in proc.stdout
        assert f'/2] sub-{sub}_T1w.nii.gz -> MNI152NLin6Asym:res-2: written' in proc.stdout
    assert '[2/2]' in proc.stdout and '[3/2]' not in proc.stdout
    # the first registration tells how long the rest will take; the last one does not
    first = next(ln for ln in proc.stdout.splitlines() if '[1/2]' in ln and 'registered' in ln)
    last = next(ln for ln in proc.stdout.splitlines() if '[2/2]' in ln and 'registered' in ln)
    assert first.endswith((' under a minute left', ' min left')) and 'left' not in last
    for sub in ('01', 'chris'):  # 2 mm LPS and 0.88 mm RAS inputs
        anat = out / f'sub-{sub}' / 'anat'
        fwd = anat / f'sub-{sub}_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.h5'
        inv = anat / f'sub-{sub}_from-MNI152NLin6Asym_to-T1w_mode-image_xfm.h5'
        img = anat / f'sub-{sub}_space-MNI152NLin6Asym_res-2_T1w.nii.gz'
        for path in (fwd, inv, img):
            assert path.is_file(), path
            assert path.with_name(path.name.split('.')[0] + '.json').is_file()
        meta = json.loads(fwd.with_suffix('.json').read_text())
        assert meta['Sources'][0] == f'bids:raw:sub-{sub}/anat/sub-{sub}_T1w.nii.gz'
        assert meta['Template'] == 'MNI152NLin6Asym' and meta['Resolution'] == '2'
        assert meta['RegistrationMode'] == 'joint' and meta['Lambda'] == 0.5
        assert set(meta['Models']) == {'affine', 'deform'}
        assert all(len(m['sha256']) == 64 for m in meta['Models'].values())
        assert meta['Models']['deform']['passes'] == 1
        assert meta['Software']['Name'] == 'synthmorph-app'
        assert 'participant' in meta['CommandLine'] and meta['Device'] == 'cpu'
        assert meta['ElapsedTime'] > 0
        assert set(meta['QC']) == {'mind_ncc', 'ncc', 'logjac_sd', 'folding_pct'}
        assert (out / f'sub-{sub}.html').is_file()
        assert (out / f'sub-{sub}' / 'figures' /
                f'sub-{sub}_space-MNI152NLin6Asym_desc-reg_T1w.svg').is_file()
    desc = json.loads((out / 'dataset_description.json').read_text())
    assert desc['DatasetType'] == 'derivative'
    # every dataset a sidecar's BIDS URI names is linked (bids:raw:..., bids:templateflow:...)
    uris = {s.split(':')[1] for side in out.glob('sub-*/anat/*.json')
            for s in json.loads(side.read_text())['Sources'] if s.startswith('bids:')}
    assert uris - {''} <= set(desc['DatasetLinks']) and {'raw', 'templateflow'} <= uris
    assert desc['GeneratedBy'][0]['Name'] == 'synthmorph-app'
    assert 'CodeURL' in desc['GeneratedBy'][0]
    methods = (out / 'logs' / 'CITATION.md').read_text()
    assert 'SynthMorph' in methods
    assert 'test-time' not in methods  # the tests run the networks only ($SYNTHMORPH_REFINE=0)
    assert list((out / 'logs').glob('config_*.json'))
    assert not list(out.glob('**/.*.tmp'))
    # pybids indexes the output as a derivatives dataset
    from bids import BIDSLayout

    layout = BIDSLayout(shared_data / 'bids', derivatives=[str(out)], validate=False)
    found = layout.derivatives.get_pipeline('synthmorph-app').get(
        space='MNI152NLin6Asym', suffix='T1w', extension='.nii.gz', return_type='file')
    assert len(found) == 2


@pytest.mark.slow
def test_h5_read_by_ants_and_nitransforms(main_run, shared_data):
    """ANTs and nitransforms map the image onto the template as our resampled output."""
    proc, out, _ = main_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    moving = shared_data / 'bids' / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz'
    fwd = out / 'sub-01' / 'anat' / 'sub-01_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.h5'
    ours = np.asanyarray(nb.load(out / 'sub-01' / 'anat' /
                                 'sub-01_space-MNI152NLin6Asym_res-2_T1w.nii.gz').dataobj)
    span = float(ours.max() - ours.min())

    import ants

    ants_template, ants_moving = ants.image_read(str(TEMPLATE)), ants.image_read(str(moving))
    ants_out = ants.apply_transforms(
        fixed=ants_template, moving=ants_moving, transformlist=[str(fwd)], interpolator='linear',
    ).numpy()
    import nitransforms as nt
    from nitransforms.resampling import apply

    xfm = nt.manip.load(str(fwd), fmt='itk')
    nt_out = np.asanyarray(apply(xfm, str(moving), reference=str(TEMPLATE), order=1).dataobj)
    # Voxels near an edge depend on each tool's edge rule: the template grid's border, and where
    # the moving image's field of view ends inside the template (a field of ones moved by ANTs
    # falls below 1 there; one voxel more for the tools' different half-voxel rules).
    from scipy import ndimage

    ones = ants_moving.new_image_like(np.ones(ants_moving.shape, dtype='float32'))
    covered = ants.apply_transforms(
        fixed=ants_template, moving=ones, transformlist=[str(fwd)], interpolator='linear',
    ).numpy() > 0.999
    interior = np.zeros(ours.shape, bool)
    interior[2:-2, 2:-2, 2:-2] = True
    inside = interior & ndimage.binary_erosion(covered, iterations=1)
    # the comparison still covers nearly the whole template grid
    assert inside.sum() > 0.9 * interior.sum()
    assert np.abs(ants_out - ours)[inside].max() < 1e-3 * span
    assert np.abs(nt_out - ours)[inside].max() < 1e-3 * span


@pytest.mark.slow
def test_group_level(main_run):
    proc, out, tmp = main_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    group = _run([out.parent / 'unused', out, 'group'], tmp)
    assert group.returncode == 0, group.stderr
    lines = (out / 'group' / 'qc.tsv').read_text().splitlines()
    assert lines[0].split('\t')[:3] == ['participant_id', 'image', 'template']
    assert len(lines) == 3
    assert '<svg' in (out / 'group' / 'qc.html').read_text()
    assert '  2 registration(s); 0 outlier(s); 0 with warnings' in group.stdout


@pytest.mark.slow
def test_failure_isolation_and_rerun(tmp_path):
    bids = tmp_path / 'bids'
    shutil.copytree(DEMO_DIR, bids)
    bad = bids / 'sub-02' / 'anat' / 'sub-02_T1w.nii.gz'
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])  # truncated
    t2w_only = bids / 'sub-03' / 'anat' / 'sub-03_T2w.nii.gz'  # no T1w: reported, not lost
    t2w_only.parent.mkdir(parents=True)
    shutil.copy(bids / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz', t2w_only)
    unfetched = bids / 'sub-04' / 'anat' / 'sub-04_T1w.nii.gz'  # a DataLad file not fetched
    unfetched.parent.mkdir(parents=True)
    unfetched.symlink_to('../../.git/annex/objects/Q1/x7/MD5E-s9--a.nii.gz/MD5E-s9--a.nii.gz')
    out = tmp_path / 'out'
    args = [bids, out, 'participant', '--mode', 'affine', '--no-figures', '-w',
            tmp_path / 'work', *FAST]
    first = _run(args, tmp_path)
    assert first.returncode == 1, first.stderr[-3000:]
    assert 'sub-02_T1w.nii.gz' in first.stderr and 'FAILED' in first.stderr
    assert 'sub-02_T1w.nii.gz -> MNI152NLin6Asym:res-2: registration FAILED' in first.stdout
    assert 'sub-03: no T1w image' in first.stderr and 'sub-03_T2w.nii.gz' in first.stderr
    assert '1 subject(s) NOT PROCESSED' in first.stderr
    assert '2 image(s) FAILED' in first.stderr
    assert (f'<{unfetched}>: The image <{unfetched}> is a link to a file that does not exist '
            '(../../.git/annex/') in first.stderr and 'datalad get' in first.stderr
    done = out / 'sub-01' / 'anat' / 'sub-01_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.json'
    t1w = bids / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz'
    assert done.is_file()
    assert not (out / 'sub-02' / 'anat').exists() or not list(
        (out / 'sub-02' / 'anat').glob('*xfm.json'))
    assert 'FAILED' in (out / 'sub-02.html').read_text()
    stamp = done.stat().st_mtime_ns
    bad.write_bytes(data)  # fixed
    t2w_only.rename(t2w_only.with_name('sub-03_T1w.nii.gz'))
    unfetched.unlink()
    shutil.copy(t2w_only.with_name('sub-03_T1w.nii.gz'), unfetched)  # fetched
    second = _run(args, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert '3 image(s) to register' in second.stdout and '1 already finished' in second.stdout
    assert 'NOT PROCESSED' not in second.stderr
    assert done.stat().st_mtime_ns == stamp
    assert (out / 'sub-02' / 'anat' /
            'sub-02_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.json').is_file()
    # another mode: the image made with the old one is registered again, not skipped
    rigid = [*args, '--participant-label', '01', '--mode', 'rigid']
    third = _run(rigid, tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert '1 image(s) to register' in third.stdout and '0 already finished' in third.stdout
    assert 'other settings: mode "affine" -> "rigid"' in third.stdout
    meta = json.loads(done.read_text())
    assert meta['RegistrationMode'] == 'rigid' and meta['RegistrationSettings']['mode'] == 'rigid'
    # threads are no setting of the registration: nothing to redo
    fourth = _run([*rigid, '--omp-nthreads', '2'], tmp_path)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert '0 image(s) to register' in fourth.stdout and '1 already finished' in fourth.stdout
    # derivatives removed, the work directory kept: Nipype's cached registration serves, and
    # the progress line says so (it said "registered in -0 s")
    done.unlink()
    fifth = _run(rigid, tmp_path)
    assert fifth.returncode == 0, fifth.stderr[-3000:]
    assert ('[1/1] sub-01_T1w.nii.gz -> MNI152NLin6Asym:res-2: registered (reused from the work '
            'directory)') in fifth.stdout
    assert done.is_file()
    meta = json.loads(done.read_text())
    sha = hashlib.sha256(t1w.read_bytes()).hexdigest()
    assert meta['RegistrationSettings']['inputs'] == {'sub-01_T1w.nii.gz': sha}
    assert meta['InputFiles']['sub-01_T1w.nii.gz'] == {
        'sha256': sha, 'size': t1w.stat().st_size, 'mtime_ns': t1w.stat().st_mtime_ns}
    # the image replaced under the same name (a rescan): registered again, not skipped
    img = nb.load(t1w)
    nb.save(nb.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine, img.header), t1w)
    sixth = _run([*rigid, '--dry-run'], tmp_path)
    assert sixth.returncode == 0, sixth.stderr[-3000:]
    assert '1 image(s) to register' in sixth.stdout and '0 already finished' in sixth.stdout
    assert '(changed: sub-01_T1w.nii.gz)' in sixth.stdout


@pytest.mark.slow
def test_concurrent_runs_share_one_output(tmp_path):
    out = tmp_path / 'out'
    procs = [
        subprocess.Popen(
            [sys.executable, '-m', 'synthmorph_app', str(DEMO_DIR), str(out), 'participant',
             '--participant-label', sub, '--mode', 'affine', '--no-figures', '-w',
             str(tmp_path / 'work'), '--nprocs', '1', '--omp-nthreads', '1', '--extent', '192'],
            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for sub in ('01', '02')
    ]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    assert json.loads((out / 'dataset_description.json').read_text())['DatasetType'] == \
        'derivative'
    assert 'SynthMorph' in (out / 'logs' / 'CITATION.md').read_text()
    assert len(list((out / 'logs').glob('config_*.json'))) == 2
    for sub in ('01', '02'):
        assert (out / f'sub-{sub}' / 'anat' /
                f'sub-{sub}_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.json').is_file()
    assert not list(out.glob('**/.*.tmp'))


def test_exit_codes(tmp_path, shared_data):
    # 16: not BIDS
    (tmp_path / 'notbids').mkdir()
    res = _run([tmp_path / 'notbids', tmp_path / 'o', 'participant'], tmp_path)
    assert res.returncode == 16 and 'dataset_description.json' in res.stderr
    # 18: nothing matches
    res = _run([DEMO_DIR, tmp_path / 'o', 'participant', '--participant-label', '99'], tmp_path)
    assert res.returncode == 18 and '99' in res.stderr
    # 1: a template that is not available offline, with a message saying how to provide it
    res = _run([DEMO_DIR, tmp_path / 'o', 'participant', '--output-spaces',
                'MNI152NLin2009cAsym:res-1'], tmp_path)
    assert res.returncode == 1 and 'TEMPLATEFLOW_HOME' in res.stderr
    # 2: bad arguments
    res = _run([DEMO_DIR, tmp_path / 'o', 'participant', '--lambda', '2'], tmp_path)
    assert res.returncode == 2
    # dry run: the plan, no work
    res = _run([shared_data / 'bids', tmp_path / 'o', 'participant', '--participant-label',
                '01', 'chris', '--contrasts', 'all', '--dry-run'], tmp_path)
    assert res.returncode == 0, res.stderr
    assert 'sub-chris_PDw.nii.gz' in res.stdout and 'sub-01_FLAIR.nii.gz' in res.stdout
    # 1: a label the dataset does not have, beside one it has (a typo in an array job's list)
    res = _run([DEMO_DIR, tmp_path / 'o', 'participant', '--participant-label', '01', '99',
                '--dry-run'], tmp_path)
    assert res.returncode == 1 and 'sub-99: not in' in res.stderr, res.stderr
    assert 'sub-01_T1w.nii.gz' in res.stdout
    # 1: --device cuda where torch has none: said once, before any registration starts
    import torch

    if not torch.cuda.is_available():
        out = tmp_path / 'cuda'
        res = _run([DEMO_DIR, out, 'participant', '--participant-label', '01', '--device',
                    'cuda'], tmp_path)
        assert res.returncode == 1 and res.stderr.count('no CUDA device') == 1, res.stderr
        assert not list(out.glob('sub-01*')) and 'crash' not in res.stderr
    res = _run(['--version'], tmp_path)
    assert res.returncode == 0 and 'synthmorph-app' in res.stdout
    res = _run([DEMO_DIR, tmp_path / 'o', 'participant', '--help'], tmp_path)
    assert res.returncode == 0 and '--output-spaces' in res.stdout


def test_bids_filter_file(tmp_path, shared_data):
    filt = tmp_path / 'filter.json'
    filt.write_text(json.dumps({'t1w': {'acquisition': 'mprage'}}))
    res = _run([shared_data / 'bids', tmp_path / 'o', 'participant', '--bids-filter-file', filt,
                '--dry-run'], tmp_path)
    assert res.returncode == 18, res.stderr  # no T1w has acq-mprage
    filt.write_text(json.dumps({'t1w': {'acquisition': None}}))
    res = _run([shared_data / 'bids', tmp_path / 'o', 'participant', '--bids-filter-file', filt,
                '--participant-label', 'chris', '--dry-run'], tmp_path)
    assert res.returncode == 0, res.stderr
    assert 'sub-chris_T1w' in res.stdout


def test_filter_keys_and_a_sidecar_that_is_not_json(tmp_path):
    bids = tmp_path / 'bids'
    shutil.copytree(DEMO_DIR, bids)
    (bids / 'T1w.json').write_text(json.dumps({'RepetitionTime': 2.3}))  # inherited by both
    filt = tmp_path / 'filter.json'
    filt.write_text(json.dumps({'t1w': {'RepetitionTime': 2.3}}))  # a sidecar field selects
    res = _run([bids, tmp_path / 'o', 'participant', '--bids-filter-file', filt, '--dry-run'],
               tmp_path)
    assert res.returncode == 0, res.stderr
    assert 'sub-01_T1w.nii.gz' in res.stdout and 'sub-02_T1w.nii.gz' in res.stdout
    filt.write_text(json.dumps({'t1w': {'acq': 'mprage'}}))  # a short entity name: refused
    res = _run([bids, tmp_path / 'o', 'participant', '--bids-filter-file', filt, '--dry-run'],
               tmp_path)
    assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr
    assert "t1w: 'acq' is neither a BIDS entity nor a sidecar field" in res.stderr
    # one broken sidecar does not stop the dataset: named in a warning, metadata not indexed
    bad = bids / 'sub-02' / 'anat' / 'sub-02_T1w.json'
    bad.write_text('{"RepetitionTime": 2.3')
    res = _run([bids, tmp_path / 'o', 'participant', '--dry-run'], tmp_path)
    assert res.returncode == 0, res.stderr
    assert f'the sidecar <{bad}> is not valid JSON' in res.stderr
    assert 'sub-01_T1w.nii.gz' in res.stdout and 'sub-02_T1w.nii.gz' in res.stdout
    filt.write_text(json.dumps({'t1w': {'RepetitionTime': 2.3}}))  # now unknown: refused
    res = _run([bids, tmp_path / 'o', 'participant', '--bids-filter-file', filt, '--dry-run'],
               tmp_path)
    assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr
    assert "'RepetitionTime' is neither a BIDS entity nor a sidecar field" in res.stderr
    func = bids / 'sub-03' / 'func' / 'sub-03_task-rest_bold.json'  # no anatomical image
    func.parent.mkdir(parents=True)
    func.write_text('{}')
    res = _run([bids, tmp_path / 'o', 'participant', '--contrasts', 'all', '--dry-run'],
               tmp_path)
    assert res.returncode == 0, res.stderr
    assert ('sub-03: no anatomical image selected, not processed (it has no anatomical image, '
            'anat/*.nii[.gz]).') in res.stderr


def test_other_subjects_are_neither_validated_nor_indexed(tmp_path):
    # an array job over sub-01 of a large dataset: a misnamed file or a broken sidecar of
    # another subject does not stop it (and that subject's folder is not walked)
    bids = tmp_path / 'bids'
    shutil.copytree(DEMO_DIR, bids)
    (bids / 'sub-02' / 'anat' / 'sub-02_T1w.json').write_text('{"RepetitionTime": ')
    (bids / 'sub-02' / 'anat' / 'notes.txt').write_text('scanned twice')
    res = _run([bids, tmp_path / 'o', 'participant', '--participant-label', '01', '--dry-run'],
               tmp_path)
    assert res.returncode == 0, res.stderr
    assert 'sub-01_T1w.nii.gz' in res.stdout and 'sub-02' not in res.stdout + res.stderr
    res = _run([bids, tmp_path / 'o', 'participant', '--dry-run'], tmp_path)
    assert res.returncode == 16 and 'notes.txt' in res.stderr, res.stderr


def test_missing_subject_message_names_the_selection(tmp_path):
    # sub-01 has a T1w in ses-1 only and a T2w in ses-2; sub-02 a T1w in ses-2
    bids = tmp_path / 'bids'
    shutil.copytree(DEMO_DIR, bids)
    for sub, moves in {'01': {'T1w': '1', 'T2w': '2'}, '02': {'T1w': '2'}}.items():
        anat = bids / f'sub-{sub}' / 'anat'
        source = anat / f'sub-{sub}_T1w.nii.gz'
        for suffix, ses in moves.items():
            dest = bids / f'sub-{sub}' / f'ses-{ses}' / 'anat' / f'sub-{sub}_ses-{ses}_{suffix}.nii.gz'
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, dest)
        shutil.rmtree(anat)
    res = _run([bids, tmp_path / 'o', 'participant', '--session-label', '2', '--dry-run'],
               tmp_path)
    assert res.returncode == 0, res.stderr
    assert 'sub-02_ses-2_T1w.nii.gz' in res.stdout and 'sub-01' not in res.stdout
    assert ('sub-01: no T1w image selected, not processed (its anatomical images in the selected '
            'session(s) 2: sub-01_ses-2_T2w.nii.gz; choose contrasts with --contrasts).'
            ) in res.stderr
    filt = tmp_path / 'filter.json'
    filt.write_text(json.dumps({'t1w': {'session': '1'}}))
    res = _run([bids, tmp_path / 'o', 'participant', '--bids-filter-file', filt,
                '--participant-label', '01', '02', '--dry-run'], tmp_path)
    assert res.returncode == 0, res.stderr
    assert 'sub-01_ses-1_T1w.nii.gz' in res.stdout
    assert ('sub-02: no T1w image selected, not processed (its anatomical images: '
            'sub-02_ses-2_T1w.nii.gz; choose contrasts with --contrasts or check '
            '--bids-filter-file).') in res.stderr
    filt.write_text(json.dumps({'flair': {'acquisition': 'x'}}))  # filters no asked contrast
    res = _run([bids, tmp_path / 'o', 'participant', '--bids-filter-file', filt,
                '--session-label', 'ses-2', '--dry-run'], tmp_path)
    assert res.returncode == 0, res.stderr
    assert ('sub-01: no T1w image selected, not processed (its anatomical images in the selected '
            'session(s) 2: sub-01_ses-2_T2w.nii.gz; choose contrasts with --contrasts).'
            ) in res.stderr


@pytest.mark.slow
def test_lesion_mask_is_found_used_and_recorded(tmp_path):
    """A ``label-lesion_roi`` drawn beside a T1w after a first run (as fMRIPrep reads it;
    outside the BIDS schema, so the input check lets it pass, as it does what ``.bidsignore``
    lists): the rerun redoes that image only, the plan names the mask, the registration uses
    it, the sidecars name it, the methods text says so, and the lesion is written on the
    template grid; the other subject has none."""
    bids = tmp_path / 'bids'
    shutil.copytree(DEMO_DIR, bids)
    out = tmp_path / 'out'
    args = [bids, out, 'participant', '--mode', 'affine', '--no-figures', '-w',
            tmp_path / 'work', *FAST]
    first = _run(args, tmp_path)  # before the mask was drawn
    assert first.returncode == 0, first.stderr[-3000:]
    anat = bids / 'sub-01' / 'anat'
    t1w = nb.load(anat / 'sub-01_T1w.nii.gz')
    data = t1w.get_fdata()
    ijk = np.indices(data.shape).reshape(3, -1).T
    world = nb.affines.apply_affine(t1w.affine, ijk)
    head = data.reshape(-1) > np.percentile(data, 70)
    centre = world[head].mean(axis=0) + np.array([30.0, 0.0, 15.0])
    ball = (np.linalg.norm(world - centre, axis=1) < 12).reshape(data.shape)
    nb.save(nb.Nifti1Image(ball.astype(np.uint8), t1w.affine),
            anat / 'sub-01_label-lesion_roi.nii.gz')
    (anat / 'notes.txt').write_text('scanned twice\n')
    (bids / '.bidsignore').write_text('*.txt\n')
    plan = _run([*args, '--dry-run'], tmp_path)
    assert plan.returncode == 0, plan.stderr[-3000:]
    # the mask is new: sub-01 is redone with it, sub-02 (no mask) stays finished
    assert '1 image(s) to register' in plan.stdout and '1 already finished' in plan.stdout
    assert 'sub-01_T1w.nii.gz -> MNI152NLin6Asym:res-2 (lesion mask ' \
        'sub-01_label-lesion_roi.nii.gz)' in plan.stdout
    run = _run(args, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    sidecars = {sub: json.loads((out / f'sub-{sub}' / 'anat' /
                                 f'sub-{sub}_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.json')
                                .read_text()) for sub in ('01', '02')}
    uri = 'bids:raw:sub-01/anat/sub-01_label-lesion_roi.nii.gz'
    assert sidecars['01']['LesionMask'] == uri and uri in sidecars['01']['Sources']
    assert 'LesionMask' not in sidecars['02']
    assert not any('lesion' in s for s in sidecars['02']['Sources'])
    assert 'cost-function masking' in (out / 'logs' / 'CITATION.md').read_text()
    # the lesion on the template grid, a valid BIDS derivative mask, for lesion-symptom mapping
    std = out / 'sub-01' / 'anat' / 'sub-01_space-MNI152NLin6Asym_res-2_label-lesion_mask.nii.gz'
    lesion_std = nb.load(std)
    tpl = nb.load(TEMPLATE)
    assert lesion_std.shape == tpl.shape and np.allclose(lesion_std.affine, tpl.affine)
    values = np.asarray(lesion_std.dataobj)
    assert set(np.unique(values)) == {0, 1}
    volume = values.sum() * np.prod(lesion_std.header.get_zooms()[:3])
    drawn = ball.sum() * np.prod(t1w.header.get_zooms()[:3])
    assert 0.5 * drawn < volume < 2 * drawn, (volume, drawn)  # an affine scales it modestly
    meta = json.loads(std.with_name(std.name.replace('.nii.gz', '.json')).read_text())
    assert meta['Type'] == 'Lesion' and uri in meta['Sources']
    assert meta['SpatialReference'] == 'MNI152NLin6Asym'
    assert not list((out / 'sub-02' / 'anat').glob('*lesion*'))


def test_images_that_would_write_the_same_derivatives(tmp_path):
    """The inversions of an MP2RAGE differ only in ``inv``: each gets its own derivatives
    (they shared one name, and the workflow stopped with nipype's duplicate-node traceback).
    A ``.nii`` beside a ``.nii.gz`` of the same name would: both fail by name, the rest run."""
    bids = tmp_path / 'bids'
    anat = bids / 'sub-01' / 'anat'
    anat.mkdir(parents=True)
    shutil.copy(DEMO_DIR / 'dataset_description.json', bids)
    t1w = DEMO_DIR / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz'
    for inv in (1, 2):
        shutil.copy(t1w, anat / f'sub-01_inv-{inv}_MP2RAGE.nii.gz')
    shutil.copy(t1w, anat / 'sub-01_T1w.nii.gz')
    nb.save(nb.load(t1w), anat / 'sub-01_T1w.nii')
    out = tmp_path / 'out'
    res = _run([bids, out, 'participant', '--contrasts', 'T1w', 'MP2RAGE', '--mode', 'affine',
                '--refine', '0', '--no-figures', '--no-via-t1w',
                '-w', tmp_path / 'work', *FAST], tmp_path)
    assert res.returncode == 1, res.stderr[-3000:]
    assert 'Duplicate node name' not in res.stderr
    assert 'sub-01_T1w.nii -> MNI152NLin6Asym:res-2 (NAME CLASH' in res.stdout
    assert (f'<{anat / "sub-01_T1w.nii"}> and <{anat / "sub-01_T1w.nii.gz"}> would write the '
            'same derivatives') in res.stderr
    assert '2 image(s) FAILED' in res.stderr
    names = sorted(p.name for p in (out / 'sub-01' / 'anat').glob('*_xfm.json'))
    assert names == [f'sub-01_inv-{i}_from-{a}_to-{b}_mode-image_xfm.json'
                     for i in (1, 2) for a, b in (('MNI152NLin6Asym', 'MP2RAGE'),
                                                  ('MP2RAGE', 'MNI152NLin6Asym'))]


def test_an_output_folder_of_another_dataset_is_left_alone(tmp_path):
    """An output folder that holds another pipeline's derivatives (or raw data) keeps its
    dataset_description.json: the run stops with the reason before anything is written (our
    description replaced fMRIPrep's). Our own folder keeps a user's .bidsignore lines."""
    other = tmp_path / 'fmriprep'
    other.mkdir()
    desc = {'Name': 'fMRIPrep - fMRI PREProcessing workflow', 'BIDSVersion': '1.8.0',
            'DatasetType': 'derivative', 'GeneratedBy': [{'Name': 'fMRIPrep',
                                                          'Version': '24.1.1'}]}
    (other / 'dataset_description.json').write_text(json.dumps(desc))
    for level in ('participant', 'group'):
        res = _run([DEMO_DIR, other, level, '-w', tmp_path / 'work'], tmp_path)
        assert res.returncode == 2, res.stderr[-2000:]
        assert (f'the output directory <{other}> holds a derivative dataset (fMRIPrep 24.1.1'
                in res.stderr) and str(tmp_path / 'synthmorph') in res.stderr
        assert json.loads((other / 'dataset_description.json').read_text()) == desc
        assert sorted(p.name for p in other.iterdir()) == ['dataset_description.json']

    from synthmorph_app.utils.bids import BIDSIGNORE, write_dataset_description

    ours = tmp_path / 'ours'
    ours.mkdir()
    (ours / '.bidsignore').write_text('extra/\n*.html\n')
    write_dataset_description(ours, DEMO_DIR)
    write_dataset_description(ours, DEMO_DIR)  # a rerun adds nothing twice
    lines = (ours / '.bidsignore').read_text().splitlines()
    assert lines == ['extra/', '*.html', *(b for b in BIDSIGNORE if b != '*.html')]
    res = _run([DEMO_DIR, ours, 'participant', '--dry-run', '-w', tmp_path / 'work'],
               tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]


def test_weights_named_relative_to_the_working_folder(tmp_path):
    """``--weights affine.pt`` from the folder that holds it: the registration runs in a
    node folder of its own and failed with "Model file <affine.json> does not exist"."""
    from synthmorph_app.engine.weights import _packaged_dir

    here = tmp_path / 'models'
    here.mkdir()
    for ext in ('.pt', '.json'):
        shutil.copy(_packaged_dir() / f'affine{ext}', here / f'my_affine{ext}')
    out = tmp_path / 'out'
    res = _run([DEMO_DIR, out, 'participant', '--participant-label', '01', '--mode', 'affine',
                '--refine', '0', '--no-figures', '--weights', 'my_affine.pt', '-w',
                tmp_path / 'work', *FAST], tmp_path, cwd=here)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((out / 'sub-01' / 'anat' /
                       'sub-01_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.json').read_text())
    assert meta['RegistrationSettings']['weights'] == {'affine': str(here / 'my_affine.pt')}


@pytest.mark.slow
def test_resolutions_of_one_template_share_one_registration(tmp_path, shared_data):
    """``--output-spaces MNI152NLin6Asym:res-2 MNI152NLin6Asym:res-1``: the transform files
    are named by the template alone, so both spaces come from one registration (to res-2,
    listed first); each image is that transform resampled onto its grid. Each space ran its
    own registration, and the last one's transform overwrote the other's."""
    from synthmorph_app.engine.register import moved_image
    from synthmorph_app.io.images import Geometry
    from synthmorph_app.io.transforms import load_transform

    home = tmp_path / 'templateflow'
    shutil.copytree(TEMPLATE.parent, home / TEMPLATE.parent.name)
    tpl1 = home / TEMPLATE.parent.name / 'tpl-MNI152NLin6Asym_res-01_T1w.nii.gz'
    shutil.copy(shared_data / 'templateflow' / 'tpl-MNI152NLin6Asym' /
                'tpl-MNI152NLin6Asym_res-01_desc-brain_T1w.nii.gz', tpl1)
    out, work = tmp_path / 'out', tmp_path / 'work'
    spaces = ['MNI152NLin6Asym:res-2', 'MNI152NLin6Asym:res-1']

    def run(*extra):
        return subprocess.run(
            [sys.executable, '-m', 'synthmorph_app', str(DEMO_DIR), str(out), 'participant',
             '--participant-label', '01', '--mode', 'affine', '--refine', '0', '--no-figures',
             '-w', str(work), *FAST, '--output-spaces', *spaces, *extra],
            env=_env(tmp_path) | {'TEMPLATEFLOW_HOME': str(home)}, capture_output=True,
            text=True, timeout=600, check=False)

    res = run()
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((work / 'registrations').iterdir())) == 1  # one registration
    anat = out / 'sub-01' / 'anat'
    xfm = anat / 'sub-01_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.h5'
    meta = json.loads(xfm.with_suffix('.json').read_text())
    assert meta['TemplateSpec'] == {'res': '2'} and meta['Sources'][1].endswith(TEMPLATE.name)
    forward = load_transform(xfm)
    t1w = nb.load(DEMO_DIR / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz')
    for res_, grid in (('2', TEMPLATE), ('1', tpl1)):
        written = nb.load(anat / f'sub-01_space-MNI152NLin6Asym_res-{res_}_T1w.nii.gz')
        again = moved_image(t1w, forward, Geometry.from_image(nb.load(grid)))
        assert written.shape == nb.load(grid).shape
        a, b = written.get_fdata(), again.get_fdata()
        assert np.abs(a - b).max() <= 1e-4 * np.ptp(a), res_
    # one space of the template missing: both are made again, from one registration
    (anat / 'sub-01_space-MNI152NLin6Asym_res-1_T1w.nii.gz').unlink()
    res = run('--dry-run')
    assert 'sub-01_T1w.nii.gz -> MNI152NLin6Asym:res-2, MNI152NLin6Asym:res-1' in res.stdout


@pytest.mark.slow
def test_warnings_are_kept_with_the_derivatives_and_summed_up(tmp_path):
    """An image the engine warns about (a sform scaled against its voxel sizes, which ANTs
    would not read) is named in the run's summary, and its sidecars and report carry the
    warning; an image without any carries none."""
    bids = tmp_path / 'bids'
    shutil.copytree(DEMO_DIR, bids)
    odd = bids / 'sub-02' / 'anat' / 'sub-02_T1w.nii.gz'
    img = nb.load(odd)
    img.set_sform(img.affine @ np.diag([1.03, 1.0, 1.0, 1.0]), code=1)  # qform kept
    nb.save(img, odd)
    out = tmp_path / 'out'
    res = _run([bids, out, 'participant', '--mode', 'affine', '--no-figures', '-w',
                tmp_path / 'work', *FAST], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ('1 image(s) registered with warnings (see their reports, or "Warnings" in the '
            'sidecars): sub-02_T1w.nii.gz') in res.stdout
    name = '_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.json'
    warned = json.loads((out / 'sub-02' / 'anat' / f'sub-02{name}').read_text())['Warnings']
    assert len(warned) == 1 and 'qform and an sform' in warned[0] and str(odd) in warned[0]
    assert 'Warnings' not in json.loads((out / 'sub-01' / 'anat' / f'sub-01{name}').read_text())
    assert 'qform and an sform' in (out / 'sub-02.html').read_text()
    group = _run([bids, out, 'group'], tmp_path)  # the group level counts and names it
    assert group.returncode == 0, group.stderr
    assert '; 1 with warnings: sub-02_T1w.nii.gz' in group.stdout


@pytest.mark.slow
def test_the_default_work_folder_keeps_only_what_failed(tmp_path):
    """Without -w, the temp work folder would grow by tens of MB per image over runs: the
    files of finished images are removed at the end, a failed image's stay; with -w all stay."""
    bids = tmp_path / 'bids'
    shutil.copytree(DEMO_DIR, bids)
    bad = bids / 'sub-02' / 'anat' / 'sub-02_T1w.nii.gz'
    bad.write_bytes(bad.read_bytes()[:5000])  # truncated
    args = [bids, tmp_path / 'out', 'participant', '--mode', 'rigid', '--no-figures', *FAST]
    res = _run(args, tmp_path)
    assert res.returncode == 1, res.stderr[-3000:]
    assert 'sub-02_T1w.nii.gz' in res.stderr and 'FAILED' in res.stderr
    work = tmp_path / f'synthmorph-app-work-{os.getuid()}' / 'synthmorph_wf'  # TMPDIR=tmp
    assert not (work / 'sub_01_wf').exists()
    assert (work / 'sub_02_wf' / 'anat_sub02_T1w_wf').is_dir()
    kept = tmp_path / 'kept'
    res = _run([bids, tmp_path / 'out2', *args[2:], '--participant-label', '01', '-w', kept],
               tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (kept / 'synthmorph_wf' / 'sub_01_wf' / 'anat_sub01_T1w_wf').is_dir()


@pytest.mark.slow
def test_sigterm_stops_the_run_as_ctrl_c_does(tmp_path):
    """A batch system's time limit (SIGTERM to every process of the job) ended the run on the
    spot: no message, no exit code of its own. Now it stops as Ctrl-C does: within seconds,
    the workers too, exit 143, one line saying what happened, nothing that looks complete."""
    import signal
    import time

    out = tmp_path / 'out'
    env = {**_env(tmp_path), 'PYTHONUNBUFFERED': '1'}
    proc = subprocess.Popen(
        [sys.executable, '-m', 'synthmorph_app', str(DEMO_DIR), str(out), 'participant',
         '--no-figures', '-w', str(tmp_path / 'work'), *FAST],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    for line in proc.stdout:  # the plan is printed: the workflow is starting
        if line.startswith('  sub-02:'):
            break
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGTERM)
    start = time.time()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, err[-3000:]
    assert time.time() - start < 60
    stopped = ('synthmorph-app: stopped by SIGTERM (a time limit?); finished images are kept, '
               'a rerun completes the others.')
    assert err.strip().splitlines() == [stopped], err[-3000:]
    assert not list(out.glob('sub-*/anat/*xfm.json'))  # nothing looks complete
    assert not list(out.glob('**/.*.tmp'))


def test_the_methods_text_follows_the_refinement_asked_for(tmp_path):
    """The refinement that made the results is in the methods text (it was left out): with
    --refine 3 and --refine-metric mind it is named, with its metric."""
    from synthmorph_app.cli.bids import (
        _registration_settings,
        _write_citation,
        build_bids_parser,
    )

    args = build_bids_parser().parse_args([str(DEMO_DIR), str(tmp_path), 'participant',
                                           '--refine', '3', '--refine-metric', 'mind'])
    _write_citation(tmp_path, ['MNI152NLin6Asym:res-2'], args, _registration_settings(args, None))
    methods = (tmp_path / 'logs' / 'CITATION.md').read_text()
    assert ('test-time optimisation of the affine transform, then the stationary velocity field, '
            'coarse to fine (3 iterations at the finest level), maximising the agreement of '
            'MIND-SSC descriptors [@heinrich2013]') in methods
    assert 'heinrich2013' in (tmp_path / 'logs' / 'CITATION.bib').read_text()


@pytest.mark.parametrize('method', ['forkserver', 'spawn'])
def test_workers_that_do_not_inherit_the_run_keep_it_quiet(tmp_path, method):
    """MultiProc workers from a fork server (a ``--device cuda`` run; every run on Python 3.14
    and later, where it is the default start method) or spawned (macOS, Windows) do not
    inherit the Nipype log level the run set: they printed Nipype's INFO lines for every
    node. Here the default start method is made each of them, as on those systems."""
    out = tmp_path / 'out'
    script = tmp_path / 'app.py'  # a main module, as the console script: spawn imports it again
    script.write_text('import multiprocessing, sys\n'
                      'from synthmorph_app.cli.run import main\n'
                      "if __name__ == '__main__':\n"
                      f'    multiprocessing.set_start_method({method!r})\n'
                      '    sys.exit(main(sys.argv[1:]))\n')
    proc = subprocess.run(
        [sys.executable, str(script), str(DEMO_DIR), str(out), 'participant', '--mode',
         'affine', '--no-figures', '-w', str(tmp_path / 'work'), *FAST],
        check=False, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.glob('sub-*/anat/*_xfm.h5'))) == 4
    said = proc.stdout + proc.stderr
    assert 'nipype.workflow INFO' not in said and '[Node]' not in said, said[-3000:]


@pytest.mark.skipif(not __import__('torch').cuda.is_available(), reason='needs a CUDA device')
def test_bids_app_on_cuda_writes_every_transform(tmp_path):
    """The BIDS-App with --device cuda and MultiProc workers: every registration failed on
    the first GPU it met (workers forked after torch touched CUDA), unnoticed on CPU-only CI."""
    out = tmp_path / 'out'
    res = _run([DEMO_DIR, out, 'participant', '--mode', 'affine', '--no-figures', '--device',
                'cuda', '-w', tmp_path / 'work', *FAST], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'registering on the GPU' in res.stdout
    assert len(list(out.glob('sub-*/anat/*_xfm.h5'))) == 4
