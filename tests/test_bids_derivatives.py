"""BIDS-App derivatives: ``--output-lta``, sessions, and names the BIDS schema accepts.

Real runs of the CLI in subprocesses on the packaged 2 mm demo images (networks only:
``SYNTHMORPH_REFINE=0`` from conftest), ``HOME`` unwritable and ``TEMPLATEFLOW_HOME`` unset.

What validates the names, offline (nothing is downloaded):

- ``bidsschematools`` (installed with pybids) holds the BIDS schema; its rules for raw,
  common and *derivative* files judge ``dataset_description.json``, ``logs/``, the resampled
  images ``*_space-<tpl>_res-<N>_T1w.nii.gz`` and their sidecars: entity order, labels, and
  that ``sub``/``ses`` in the name match the folders.
- ``bids_validator.BIDSValidator`` (the legacy Python validator pybids depends on) knows raw
  names only: it rejects every derivative name (``space-``, ``from-``/``to-``), so it can
  judge only the dataset-level files and ``logs/``, and the input dataset.
- Transforms (``from-/to-/mode-`` ``_xfm``) are not in the BIDS specification yet (BEP014);
  they are checked against sMRIPrep/fMRIPrep's naming (niworkflows' ``nipreps.json`` pattern,
  with ``desc`` after ``mode`` as fMRIPrep writes ``mode-image_desc-coreg_xfm``) and must be
  indexed by pybids with the right entities.
- Reports and figures (``*.html``, ``sub-*/figures/``) are outside BIDS; the app lists them in
  ``.bidsignore``, which the official validator honours.
Neither validator checks file contents or sidecar fields here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synthmorph_app.cli.bids import DEMO_DIR
from synthmorph_app.io.transforms import load_transform
from synthmorph_app.utils.bids import bidsignored

FAST = ['--extent', '192', '--nprocs', '1', '--omp-nthreads', '1']
TPL = 'MNI152NLin6Asym'
#: sMRIPrep's anatomical transform names (niworkflows nipreps.json), ``desc`` and LTA added.
XFM_NAME = re.compile(
    r'sub-(?P<sub>[a-zA-Z0-9]+)/(?:ses-(?P<ses>[a-zA-Z0-9]+)/)?anat/'
    r'sub-(?P=sub)(?:_ses-(?P=ses))?(?:_acq-[a-zA-Z0-9]+)?(?:_ce-[a-zA-Z0-9]+)?'
    r'(?:_rec-[a-zA-Z0-9]+)?(?:_run-[0-9]+)?'
    r'_from-[a-zA-Z0-9]+_to-[a-zA-Z0-9]+_mode-(?:image|points)(?:_desc-[a-zA-Z0-9]+)?'
    r'_xfm\.(?:h5|txt|lta|json)'
)
POINTS = np.random.default_rng(0).uniform(-70, 70, size=(50, 3))


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ('TEMPLATEFLOW_HOME', 'XDG_CACHE_HOME', 'SYNTHMORPH_WEIGHTS_DIR')}
    env.update(HOME='/proc/synthmorph-no-home', NIPYPE_NO_ET='1', SYNTHMORPH_POLL_SLEEP='0.05',
               MPLCONFIGDIR=str(tmp / 'mpl'), TMPDIR=str(tmp), OMP_NUM_THREADS='1')
    return env


def _run(args, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'synthmorph_app', *map(str, args)],
                          env=_env(tmp), capture_output=True, check=False, text=True,
                          timeout=600)


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob('*') if p.is_file())


@pytest.fixture(scope='module')
def joint_run(tmp_path_factory):
    """Demo sub-01, joint mode, figures on, ``--output-lta``."""
    tmp = tmp_path_factory.mktemp('lta')
    out = tmp / 'out'
    proc = _run([DEMO_DIR, out, 'participant', '--participant-label', '01', '--output-lta',
                 '-w', tmp / 'work', *FAST], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, tmp


@pytest.fixture(scope='module')
def session_runs(tmp_path_factory):
    """sub-01 with two sessions, registered in one run (affine, ``--output-lta``)."""
    tmp = tmp_path_factory.mktemp('sessions')
    bids = tmp / 'bids'
    bids.mkdir()
    shutil.copy(DEMO_DIR / 'dataset_description.json', bids)
    for ses, src in (('1', '01'), ('2', '02')):
        anat = bids / 'sub-01' / f'ses-{ses}' / 'anat'
        anat.mkdir(parents=True)
        (anat / f'sub-01_ses-{ses}_T1w.nii.gz').symlink_to(
            DEMO_DIR / f'sub-{src}' / 'anat' / f'sub-{src}_T1w.nii.gz')
    out = tmp / 'out'
    run = _run([bids, out, 'participant', '--mode', 'affine', '--output-lta', '--no-figures',
                '-w', tmp / 'work', *FAST], tmp)
    return {'bids': bids, 'out': out, 'tmp': tmp, 'run': run}


def _nitransforms_affine(h5: Path) -> np.ndarray:
    """The affine member of an ITK composite as nitransforms reads it (not our reader)."""
    import nitransforms as nt

    chain = nt.manip.load(str(h5), fmt='itk')
    (affine,) = [x for x in chain.transforms if hasattr(x, 'matrix')]
    return np.asarray(affine.matrix)


@pytest.mark.slow
def test_lta_joint_is_the_linear_part(joint_run):
    import nitransforms as nt

    out, _ = joint_run
    anat = out / 'sub-01' / 'anat'
    assert not list(anat.glob('*_mode-image_xfm.lta')), 'a full-looking LTA of a warp'
    for src, dst in (('T1w', TPL), (TPL, 'T1w')):
        h5 = anat / f'sub-01_from-{src}_to-{dst}_mode-image_xfm.h5'
        lta = anat / f'sub-01_from-{src}_to-{dst}_mode-image_desc-linear_xfm.lta'
        assert lta.is_file(), _files(out)
        meta = json.loads(lta.with_suffix('.json').read_text())
        assert 'LINEAR PART ONLY' in meta['Description'] and 'NOT the full' in meta['Description']
        assert meta['Sources'] == [f'bids::sub-01/anat/{h5.name}']
        assert meta['Type'].startswith('FreeSurfer LTA')
        assert (meta['FromSpace'], meta['ToSpace']) == (src, dst)
        assert meta['RegistrationMode'] == 'joint'

        full = load_transform(h5)
        assert full.field is not None  # the .h5 has a warp the LTA leaves out
        ours = load_transform(lta)
        assert ours.is_linear
        assert ours.reference == full.reference and ours.moving == full.moving
        linear_part = full.affine
        np.testing.assert_allclose(ours.map_points(POINTS),
                                   (POINTS @ linear_part[:3, :3].T) + linear_part[:3, 3],
                                   atol=1e-3)
        # nitransforms, reading both files itself, agrees
        theirs = nt.linear.load(str(lta), fmt='fs')
        np.testing.assert_allclose(theirs.map(POINTS), ours.map_points(POINTS), atol=1e-3)
        np.testing.assert_allclose(theirs.matrix, _nitransforms_affine(h5), atol=1e-4)
    # the forward and inverse linear parts are inverses
    fwd = load_transform(anat / f'sub-01_from-T1w_to-{TPL}_mode-image_desc-linear_xfm.lta')
    inv = load_transform(anat / f'sub-01_from-{TPL}_to-T1w_mode-image_desc-linear_xfm.lta')
    np.testing.assert_allclose(inv.map_points(fwd.map_points(POINTS)), POINTS, atol=1e-3)


@pytest.mark.slow
def test_lta_resume_and_index(joint_run):
    out, tmp = joint_run
    args = [DEMO_DIR, out, 'participant', '--participant-label', '01', '--dry-run', *FAST]
    res = _run([*args, '--output-lta'], tmp)
    assert res.returncode == 0 and '0 image(s) to register' in res.stdout, res.stdout
    # asked with the default --extent, the image made at 192 mm would be made again
    res = _run([*args, '--output-lta', '--extent', '256'], tmp)
    assert '1 image(s) to register' in res.stdout, res.stdout
    assert 'other settings: extent 192.0 -> 256.0' in res.stdout
    lta = out / 'sub-01' / 'anat' / f'sub-01_from-T1w_to-{TPL}_mode-image_desc-linear_xfm.lta'
    kept = lta.read_bytes()
    lta.unlink()
    try:  # asked for LTAs that are missing: the image is redone
        res = _run([*args, '--output-lta'], tmp)
        assert '1 image(s) to register' in res.stdout, res.stdout
    finally:
        lta.write_bytes(kept)
    from bids import BIDSLayout

    layout = BIDSLayout(str(out), validate=False, is_derivative=True)
    found = layout.get(suffix='xfm', extension='.lta', desc='linear', return_type='object')
    assert {(f.entities['from'], f.entities['to'], f.entities['mode']) for f in found} == {
        ('T1w', TPL, 'image'), (TPL, 'T1w', 'image')}
    assert len(layout.get(suffix='xfm', extension='.h5', desc=None)) == 2


@pytest.mark.slow
def test_lta_linear_mode_is_the_whole_transform(session_runs):
    import nitransforms as nt

    assert session_runs['run'].returncode == 0, session_runs['run'].stderr[-3000:]
    anat = session_runs['out'] / 'sub-01' / 'ses-1' / 'anat'
    assert not list(anat.glob('*desc-linear*'))
    for src, dst in (('T1w', TPL), (TPL, 'T1w')):
        stem = anat / f'sub-01_ses-1_from-{src}_to-{dst}_mode-image_xfm'
        h5, lta = load_transform(stem.with_suffix('.h5')), load_transform(stem.with_suffix('.lta'))
        assert h5.is_linear and lta.is_linear
        np.testing.assert_allclose(lta.map_points(POINTS), h5.map_points(POINTS), atol=1e-3)
        theirs = nt.linear.load(str(stem.with_suffix('.lta')), fmt='fs')
        np.testing.assert_allclose(theirs.map(POINTS), h5.map_points(POINTS), atol=1e-3)
        meta = json.loads(stem.with_suffix('.json').read_text())  # one sidecar, both files
        assert 'LTA' in meta and meta['RegistrationMode'] == 'affine'


@pytest.mark.slow
def test_sessions_and_session_filter(session_runs):
    run, out = session_runs['run'], session_runs['out']
    bids, tmp = session_runs['bids'], session_runs['tmp']
    assert run.returncode == 0, run.stderr[-3000:]
    assert '2 image(s) to register' in run.stdout
    files = _files(out)
    for ses in ('1', '2'):
        anat = f'sub-01/ses-{ses}/anat/sub-01_ses-{ses}'
        for name in (f'{anat}_from-T1w_to-{TPL}_mode-image_xfm.h5',
                     f'{anat}_from-{TPL}_to-T1w_mode-image_xfm.h5',
                     f'{anat}_space-{TPL}_res-2_T1w.nii.gz'):
            assert name in files and re.sub(r'\.(nii\.gz|h5)$', '.json', name) in files
        meta = json.loads((out / f'{anat}_from-T1w_to-{TPL}_mode-image_xfm.json').read_text())
        assert meta['Sources'][0] == f'bids:raw:{anat}_T1w.nii.gz'
    derivatives = [f for f in files if f.startswith('sub-01/')]
    assert all(re.match(r'sub-01/ses-(\d)/anat/sub-01_ses-\1_', f) for f in derivatives), files
    report = (out / 'sub-01.html').read_text()
    assert 'sub-01_ses-1_T1w' in report and 'sub-01_ses-2_T1w' in report
    from bids import BIDSLayout

    layout = BIDSLayout(str(bids), derivatives=[str(out)], validate=False)
    deriv = layout.derivatives.get_pipeline('synthmorph-app')
    assert deriv.get_sessions() == ['1', '2']
    assert len(deriv.get(session='2', space=TPL, suffix='T1w', extension='.nii.gz')) == 1
    # --session-label (with or without "ses-") selects what is registered
    res = _run([bids, out, 'participant', '--session-label', 'ses-2', '--no-resume',
                '--dry-run'], tmp)
    assert res.returncode == 0 and '1 image(s) to register' in res.stdout, res.stdout
    assert 'sub-01_ses-2_T1w' in res.stdout and 'ses-1' not in res.stdout
    res = _run([bids, out, 'participant', '--session-label', '3', '--dry-run'], tmp)
    assert res.returncode == 18 and 'sessions: 3' in res.stderr, res.stderr


def _schema_rules() -> list[re.Pattern]:
    """Path rules of the installed BIDS schema: raw, common and derivative files."""
    from bidsschematools import rules, schema

    bids_schema = schema.load_schema()
    out = []
    for group in (bids_schema.rules.files.common, bids_schema.rules.files.raw,
                  bids_schema.rules.files.deriv):
        out += [re.compile(r['regex'])
                for r in rules.regexify_filename_rules(group, bids_schema, level=2)]
    return out


@pytest.mark.slow
def test_every_output_is_valid_bids(joint_run, session_runs):
    pytest.importorskip('bidsschematools')
    from bids_validator import BIDSValidator

    legacy = BIDSValidator()
    rules = _schema_rules()
    assert session_runs['run'].returncode == 0
    # the inputs we built are valid raw BIDS for both validators
    for rel in _files(session_runs['bids']):
        assert legacy.is_bids('/' + rel), rel
        assert any(r.match(rel) for r in rules), rel
    seen = {'schema': 0, 'xfm': 0, 'ignored': 0}
    for out in (joint_run[0], session_runs['out']):
        ignore = (out / '.bidsignore').read_text().split()
        for rel in _files(out):
            if rel == '.bidsignore':
                continue
            if bidsignored(rel, ignore):
                assert rel.endswith(('.html', '.svg')), rel  # reports only, never data
                seen['ignored'] += 1
            elif '_xfm.' in rel:
                assert XFM_NAME.fullmatch(rel), rel
                seen['xfm'] += 1
            else:
                assert any(r.match(rel) for r in rules), f'{rel} is not a BIDS derivative name'
                seen['schema'] += 1
                if '/' not in rel or rel.startswith('logs/'):  # raw-only validator's share
                    assert legacy.is_bids('/' + rel), rel
                else:  # documents the legacy validator's limit: derivative names are unknown
                    assert not legacy.is_bids('/' + rel), rel
    assert seen['xfm'] >= 12 and seen['schema'] >= 8 and seen['ignored'] >= 3, seen
    # and the schema rules do reject what they should
    bad = ['sub-01/anat/sub-01_res-2_space-MNI152NLin6Asym_T1w.nii.gz',  # entity order
           'sub-01/ses-1/anat/sub-01_ses-2_space-MNI152NLin6Asym_T1w.nii.gz',  # ses mismatch
           'sub-01/anat/sub-01_space-MNI152NLin6Asym_T1w.h5', 'sub-01.html']
    assert not [b for b in bad if any(r.match(b) for r in rules)]
    assert not XFM_NAME.fullmatch('sub-01/anat/sub-01_desc-linear_from-T1w_to-X_mode-image_xfm.h5')
    assert not XFM_NAME.fullmatch('sub-01/anat/sub-02_from-T1w_to-X_mode-image_xfm.h5')


def test_code_url_from_project_urls(tmp_path):
    """``GeneratedBy.CodeURL`` is ``[project.urls]`` of pyproject.toml, or absent."""
    tomllib = pytest.importorskip('tomllib')
    from synthmorph_app.utils.bids import _pyproject_urls, code_url, dataset_description

    repo = Path(__file__).resolve().parents[1]
    urls = tomllib.loads((repo / 'pyproject.toml').read_text())['project']['urls']
    assert code_url() == urls['Source']
    assert dataset_description(tmp_path)['GeneratedBy'][0]['CodeURL'] == urls['Source']
    assert _pyproject_urls(repo / 'pyproject.toml')['source'] == urls['Source']
    other = tmp_path / 'pyproject.toml'  # another project's file is never read as ours
    other.write_text('[project]\nname = "other"\n[project.urls]\nSource = "https://x.org"\n')
    assert _pyproject_urls(other) == {} and _pyproject_urls(tmp_path / 'missing.toml') == {}
