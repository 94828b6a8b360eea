"""Batch workflows (``workflows/slurm``, ``workflows/local``): shellcheck, and real runs.

The Slurm array job runs against a single-node Slurm that this module starts on localhost
(munged, slurmctld and slurmd with a generated ``slurm.conf`` in a temporary folder, on free
ports), with ``SYNTHMORPH_RUNNER=direct`` instead of Singularity. Its derivatives must equal
those of a direct ``synthmorph-app`` run. Tests skip, with the reason, where ``shellcheck`` or
Slurm (Debian: ``apt-get install shellcheck slurm-wlm``) is missing or cannot start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / 'workflows' / 'slurm'
LOCAL_DIR = REPO / 'workflows' / 'local'
SCRIPTS = sorted([*SLURM_DIR.glob('*.sh'), *SLURM_DIR.glob('*.sbatch'), *LOCAL_DIR.glob('*.sh')])
#: Quick settings: 2 mm template, small network space, no figures, one thread per image.
APP_OPTIONS = ['--output-spaces', 'MNI152NLin6Asym:res-2', '--extent', '192', '--no-figures',
               '--omp-nthreads', '1']
SUBJECTS = ('01', '02')


def test_scripts_exist_and_are_executable():
    names = {p.name for p in SCRIPTS}
    assert {'synthmorph_array.sbatch', 'submit.sh', 'resubmit_failed.sh',
            'run_local.sh'} <= names
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), f'{script} is not executable'
        assert script.read_text().startswith('#!/bin/bash\n'), script


@pytest.mark.skipif(shutil.which('shellcheck') is None,
                    reason='shellcheck is not installed (Debian: apt-get install shellcheck)')
@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    proc = subprocess.run(['shellcheck', '--shell=bash', '--severity=style', str(script)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sbatch_directives():
    text = (SLURM_DIR / 'synthmorph_array.sbatch').read_text()
    directives = [ln.split(None, 1)[1] for ln in text.splitlines()
                  if ln.startswith('#SBATCH')]
    for option in ('--cpus-per-task', '--mem', '--time', '--output'):
        assert any(d.startswith(option) for d in directives), option
    # no directive after the first command: Slurm ignores those
    first_cmd = next(i for i, ln in enumerate(text.splitlines())
                     if ln.strip() and not ln.startswith('#'))
    assert all(i < first_cmd for i, ln in enumerate(text.splitlines())
               if ln.startswith('#SBATCH'))
    assert 'singularity' in text and '--cleanenv --containall' in text and '--nv' in text


# ---------------------------------------------------------------------------------------------
# data and a direct run to compare with
# ---------------------------------------------------------------------------------------------
def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ('TEMPLATEFLOW_HOME', 'XDG_CACHE_HOME', 'SYNTHMORPH_WEIGHTS_DIR')}
    env.update(NIPYPE_NO_ET='1', SYNTHMORPH_POLL_SLEEP='0.05', MPLCONFIGDIR=str(tmp / 'mpl'),
               TMPDIR=str(tmp), SYNTHMORPH_RUNNER='direct',
               SYNTHMORPH_BIN=f'{sys.executable} -m synthmorph_app')
    return env


@pytest.fixture(scope='module')
def bids_dir(shared_data, tmp_path_factory) -> Path:
    """Two subjects of the shared dataset (files linked), plus one listed but absent."""
    root = tmp_path_factory.mktemp('bids')
    src = shared_data / 'bids'
    shutil.copy(src / 'dataset_description.json', root)
    for sub in SUBJECTS:
        (root / f'sub-{sub}' / 'anat').mkdir(parents=True)
        for f in (src / f'sub-{sub}' / 'anat').iterdir():
            (root / f'sub-{sub}' / 'anat' / f.name).symlink_to(f)
    rows = ['participant_id'] + [f'sub-{s}' for s in SUBJECTS] + ['sub-nope']
    (root / 'participants.tsv').write_text('\n'.join(rows) + '\n')
    return root


@pytest.fixture(scope='module')
def direct_run(bids_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp('direct')
    out = tmp / 'out'
    proc = subprocess.run(
        [sys.executable, '-m', 'synthmorph_app', str(bids_dir), str(out), 'participant',
         '--participant-label', *SUBJECTS, '-w', str(tmp / 'work'), '--nprocs', '2',
         *APP_OPTIONS], env=_env(tmp), capture_output=True, text=True, check=False,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _derivatives(out: Path, subjects=SUBJECTS) -> list[str]:
    return sorted(str(p.relative_to(out)) for sub in subjects
                  for p in (out / f'sub-{sub}').rglob('*') if p.is_file())


def _assert_same_derivatives(out: Path, ref: Path, subjects=SUBJECTS) -> None:
    names = _derivatives(out, subjects)
    assert names == _derivatives(ref, subjects) and names
    for name in names:
        a, b = out / name, ref / name
        if name.endswith('.nii.gz'):
            x, y = np.asanyarray(nb.load(a).dataobj), np.asanyarray(nb.load(b).dataobj)
            np.testing.assert_allclose(x, y, atol=1e-4 * float(np.abs(y).max()), err_msg=name)
            np.testing.assert_allclose(nb.load(a).affine, nb.load(b).affine, atol=1e-6)
        elif name.endswith('.h5'):
            _assert_same_h5(a, b)
        elif name.endswith('.json'):
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            for key in ('Sources', 'Template', 'TemplateSpec', 'RegistrationMode', 'Lambda',
                        'Models', 'FromSpace', 'ToSpace'):
                assert ja.get(key) == jb.get(key), (name, key)


def _assert_same_h5(a: Path, b: Path) -> None:
    import h5py

    def datasets(path):
        out = {}
        with h5py.File(path, 'r') as f:
            f.visititems(lambda n, o: out.__setitem__(n, o[()])
                         if isinstance(o, h5py.Dataset) else None)
        return out

    da, db = datasets(a), datasets(b)
    assert da.keys() == db.keys()
    for key, value in da.items():
        value = np.asarray(value)
        if value.dtype.kind in 'fiu':
            np.testing.assert_allclose(value, np.asarray(db[key]), atol=1e-4, err_msg=key)
        else:
            assert np.array_equal(value, np.asarray(db[key])), key


# ---------------------------------------------------------------------------------------------
# a single-node Slurm on localhost
# ---------------------------------------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(('127.0.0.1', 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


SLURM_CONF = """\
ClusterName=smtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
SlurmUser={user}
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=smnode NodeAddr=127.0.0.1 NodeHostname={host} CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=smnode Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged + slurmctld + slurmd in ``root``; ``env`` points the Slurm clients at it."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / 'slurm.conf'
        self.env = {**os.environ, 'SLURM_CONF': str(self.conf)}

    def start(self) -> None:
        root = self.root
        root.chmod(0o755)  # munged wants its socket's folders searchable by all
        for sub in ('munge', 'state', 'spool', 'log'):
            (root / sub).mkdir(mode=0o755)
        key = root / 'munge' / 'munge.key'
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._check([
            'munged', f'--socket={root}/munge/munge.socket', f'--key-file={key}',
            f'--log-file={root}/log/munged.log', f'--pid-file={root}/munge/munged.pid',
            f'--seed-file={root}/munge/munged.seed', '--num-threads=2',
        ], 'munged')
        ctld_port, d_port = _free_ports(2)
        import pwd

        self.conf.write_text(SLURM_CONF.format(
            host=socket.gethostname(), root=root, ctld_port=ctld_port, d_port=d_port,
            user=pwd.getpwuid(os.getuid()).pw_name))
        self._check(['slurmctld', '-i'], 'slurmctld')
        self._check(['slurmd', '-N', 'smnode'], 'slurmd')
        deadline = time.time() + 30
        state = ''
        while time.time() < deadline:
            proc = subprocess.run(['sinfo', '-h', '-n', 'smnode', '-o', '%T'], env=self.env,
                                  capture_output=True, text=True, check=False)
            state = proc.stdout.strip()
            if state == 'idle':
                return
            time.sleep(0.5)
        raise RuntimeError(f'the node did not come up (state {state!r}); {self.logs()}')

    def _check(self, cmd: list[str], what: str) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=False,
                              timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f'{what} failed to start: {proc.stderr.strip()}; {self.logs()}')

    def logs(self) -> str:
        tails = []
        for log in sorted((self.root / 'log').glob('*.log')):
            lines = log.read_text(errors='replace').splitlines()[-5:]
            tails.append(f'{log.name}: ' + ' | '.join(lines))
        return ' ; '.join(tails)

    def wait(self, job_id: str, timeout: float = 400) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            proc = subprocess.run(['squeue', '-h', '-j', job_id], env=self.env,
                                  capture_output=True, text=True, check=False)
            if proc.returncode == 0 and not proc.stdout.strip():
                return
            time.sleep(1)
        raise TimeoutError(f'job {job_id} still running after {timeout} s; {self.logs()}')

    def stop(self) -> None:
        if self.conf.is_file():
            try:
                subprocess.run('squeue -h -o %A | xargs -r scancel', shell=True, env=self.env,
                               capture_output=True, check=False, timeout=20)
                subprocess.run(['scontrol', 'shutdown'], env=self.env, capture_output=True,
                               check=False, timeout=20)
                time.sleep(1)
            except subprocess.TimeoutExpired:
                pass
        for pid_file in ('slurmd.pid', 'slurmctld.pid', 'munge/munged.pid'):
            path = self.root / pid_file
            try:
                pid = int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture(scope='module')
def slurm() -> SlurmCluster:
    missing = [b for b in ('munged', 'slurmctld', 'slurmd', 'sbatch', 'squeue', 'sinfo')
               if shutil.which(b) is None]
    if missing:
        pytest.skip(f'Slurm is not installed (missing {", ".join(missing)}; Debian: '
                    'apt-get install slurm-wlm)')
    if os.getuid() != 0:
        pytest.skip('a local slurmd must run as root to start jobs')
    # short path: the munge socket path must stay under 108 characters
    root = Path(tempfile.mkdtemp(prefix='smslurm-', dir='/tmp'))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        cluster.stop()
        pytest.skip(f'a local Slurm could not start here: {err}')
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope='module')
def slurm_run(slurm, bids_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('slurm')
    out = tmp / 'out'
    env = {**_env(tmp), 'SLURM_CONF': slurm.env['SLURM_CONF'], 'SCRATCH_DIR': str(tmp / 'scr'),
           'SBATCH_EXTRA': '--cpus-per-task=1 --mem=1000 --time=00:15:00'}
    proc = subprocess.run([str(SLURM_DIR / 'submit.sh'), str(bids_dir), str(out), *APP_OPTIONS],
                          env=env, capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.strip().splitlines()[-1]
    slurm.wait(job_id)
    return out, tmp, env, job_id


@pytest.mark.slow
def test_slurm_array_matches_direct_run(slurm_run, direct_run):
    out, _, _, job_id = slurm_run
    logs = out / 'logs' / 'slurm'
    status = {p.name: p.read_text().split() for p in (logs / 'status').glob('*.status')}
    task_logs = '\n'.join(p.read_text() for p in sorted(logs.glob('*.log')))
    assert status['task-1.status'][:2] == ['ok', 'sub-01'], task_logs
    assert status['task-2.status'][:2] == ['ok', 'sub-02'], task_logs
    # one log per task, named after the array job and task
    assert sorted(p.name for p in logs.glob('*.log')) == [
        f'synthmorph_{job_id}_{i}.log' for i in (1, 2, 3)]
    _assert_same_derivatives(out, direct_run)


@pytest.mark.slow
def test_slurm_failed_task_keeps_work_and_resubmits(slurm_run):
    out, tmp, env, job_id = slurm_run
    logs = out / 'logs' / 'slurm'
    state, code, label, job, work = (logs / 'status' / 'task-3.status').read_text().split()
    assert (state, code, label, job) == ('failed', '18', 'sub-nope', job_id)
    assert Path(work).is_dir()  # kept for inspection
    # the work folders of the tasks that succeeded are gone
    assert [p for p in (tmp / 'scr').iterdir()] == [Path(work)]
    proc = subprocess.run([str(SLURM_DIR / 'resubmit_failed.sh'), '--dry-run', str(logs)],
                          env=env, capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert 'resubmitting 1 of 3 task(s): --array=3' in proc.stdout
    assert str(SLURM_DIR / 'synthmorph_array.sbatch') in proc.stdout
    assert '--no-figures' in proc.stdout


# ---------------------------------------------------------------------------------------------
# the workstation equivalent
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_local_runner_matches_direct_run(bids_dir, direct_run, tmp_path):
    parts = tmp_path / 'participants.txt'
    parts.write_text('sub-01\nnope\n')
    env = {**_env(tmp_path), 'PARTICIPANTS_FILE': str(parts),
           'SCRATCH_DIR': str(tmp_path / 'scr'), 'USE_XARGS': '1'}
    out = tmp_path / 'out'
    cmd = [str(LOCAL_DIR / 'run_local.sh'), '--jobs', '2', '--threads', '1', str(bids_dir),
           str(out), *APP_OPTIONS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # 'nope' is not in the dataset
    assert 'FAILED: nope' in proc.stderr
    status = out / 'logs' / 'local' / 'status'
    assert (status / 'sub-01.status').read_text().strip() == 'ok'
    state, code, work = (status / 'sub-nope.status').read_text().split()
    assert (state, code) == ('failed', '18') and Path(work).is_dir()
    assert 'nothing to process' in (out / 'logs' / 'local' / 'sub-nope.log').read_text()
    _assert_same_derivatives(out, direct_run, subjects=('01',))
    # --failed-only retries just 'nope'
    proc = subprocess.run([*cmd[:1], '--failed-only', *cmd[1:]], env=env, capture_output=True,
                          text=True, check=False, timeout=600)
    assert '1 participant(s)' in proc.stdout and proc.returncode == 1


def _gnu_parallel() -> bool:
    if shutil.which('parallel') is None:
        return False
    proc = subprocess.run(['parallel', '--version'], capture_output=True, text=True,
                          check=False)
    return 'GNU parallel' in proc.stdout


@pytest.mark.skipif(not _gnu_parallel(),
                    reason='GNU parallel is not installed (Debian: apt-get install parallel)')
def test_local_runner_with_gnu_parallel(bids_dir, tmp_path):
    """The GNU parallel path: quoting, the job log, statuses (participants absent: fast)."""
    parts = tmp_path / 'participants.txt'
    parts.write_text('nope\nsub-nada\n')
    env = {**_env(tmp_path), 'PARTICIPANTS_FILE': str(parts),
           'SCRATCH_DIR': str(tmp_path / 'scr')}
    out = tmp_path / 'out dir'  # a space: arguments must survive parallel's shell
    proc = subprocess.run([str(LOCAL_DIR / 'run_local.sh'), '--jobs', '2', str(bids_dir),
                           str(out), '--lambda', '0.3'], env=env, capture_output=True,
                          text=True, check=False, timeout=300)
    assert proc.returncode == 1 and 'FAILED: nope nada' in proc.stderr, proc.stderr
    logs = out / 'logs' / 'local'
    assert (logs / 'parallel.joblog').is_file()
    for label in ('nope', 'nada'):
        assert (logs / 'status' / f'sub-{label}.status').read_text().startswith('failed 18 ')
        assert 'nothing to process' in (logs / f'sub-{label}.log').read_text()
