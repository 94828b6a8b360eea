"""The README's install and demo, from a fresh clone, without the source tree.

The repository's committed ``HEAD`` is cloned into a temporary folder, installed *non-editable*
into a new virtual environment (so the package data -- weights, template, demo dataset,
label table, boilerplate -- must be in the wheel), and the environment's own
``synthmorph-app demo`` runs from a folder outside the repository, so it cannot import the
source tree. Dependencies (torch, nipype, ...) come from the environment running the tests:
the venv sees its packages (``--system-site-packages``, plus a ``.pth`` line to this
environment's ``site-packages`` when the tests themselves run in a venv), and pip installs
with ``--no-deps --no-build-isolation``, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tomllib():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip('tomli')
    return tomllib


@pytest.fixture(scope='module')
def fresh_install(tmp_path_factory):
    """A clone of ``HEAD`` installed into a new venv: ``(venv bin folder, clone, tmp)``."""
    git = shutil.which('git')
    if git is None:
        pytest.skip('git is not installed')
    if not (REPO / '.git').exists():
        pytest.skip(f'<{REPO}> is not a git checkout')
    try:
        import ensurepip  # noqa: F401  (venv needs it to put pip into the new environment)
        import venv  # noqa: F401
    except ImportError:
        pytest.skip('the venv/ensurepip modules are not available')
    tmp = tmp_path_factory.mktemp('install')
    clone = tmp / 'clone'
    subprocess.run([git, 'clone', '--quiet', '--no-hardlinks', str(REPO), str(clone)],
                   check=True, capture_output=True, timeout=300)
    env_dir = tmp / 'venv'
    made = subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages',
                           str(env_dir)], check=False, capture_output=True, text=True,
                          timeout=300)
    if made.returncode:
        pytest.skip(f'cannot create a venv: {made.stderr.strip()[-500:]}')
    bindir = env_dir / ('Scripts' if os.name == 'nt' else 'bin')
    python = bindir / 'python'
    if sys.prefix != sys.base_prefix:  # we run in a venv: expose its packages too
        purelib = subprocess.run(
            [str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
            capture_output=True, text=True, check=True).stdout.strip()
        ours = [sysconfig.get_paths()['purelib'], *site.getsitepackages()]
        # plain path lines: this environment's own .pth files (our editable install among
        # them) are not processed, so the source tree stays invisible
        Path(purelib, '_parent_env.pth').write_text('\n'.join(dict.fromkeys(ours)) + '\n')
    install = subprocess.run(
        [str(python), '-m', 'pip', 'install', '--no-deps', '--no-build-isolation',
         '--no-index', '--quiet', str(clone)],
        check=False, capture_output=True, text=True, timeout=600, cwd=tmp,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return bindir, clone, tmp


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ('TEMPLATEFLOW_HOME', 'XDG_CACHE_HOME', 'SYNTHMORPH_WEIGHTS_DIR',
                        'PYTHONPATH', 'VIRTUAL_ENV')}
    env.update(SYNTHMORPH_REFINE='0', NIPYPE_NO_ET='1', SYNTHMORPH_POLL_SLEEP='0.05',
               MPLCONFIGDIR=str(tmp / 'mpl'), TMPDIR=str(tmp), OMP_NUM_THREADS='1',
               HOME='/proc/synthmorph-no-home')
    return env


@pytest.mark.slow
def test_installed_package_is_not_the_source_tree(fresh_install):
    bindir, clone, tmp = fresh_install
    code = ('import importlib.metadata as m, synthmorph_app; print(synthmorph_app.__file__); '
            'print(m.version("synthmorph-app")); '
            'from synthmorph_app.utils.bids import code_url; print(code_url())')
    res = subprocess.run([str(bindir / 'python'), '-c', code], cwd=tmp, env=_env(tmp),
                         check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    where, version, url = res.stdout.split()
    assert Path(where).is_relative_to(bindir.parent), where
    assert not Path(where).is_relative_to(REPO) and not Path(where).is_relative_to(clone)
    assert version != '0.0.0+unknown'  # hatch-vcs found the clone's git metadata
    data = Path(where).parent / 'data'  # package data made it into the wheel
    for rel in ('weights/affine.pt', 'weights/deform.json', 'boilerplate.bib',
                'labels/freesurfer_groups.tsv', 'registration.json',
                'templateflow/tpl-MNI152NLin6Asym/tpl-MNI152NLin6Asym_res-02_T1w.nii.gz',
                'demo/dataset_description.json', 'demo/sub-02/anat/sub-02_T1w.nii.gz'):
        assert (data / rel).is_file(), rel
    # GeneratedBy.CodeURL comes from [project.urls] through the installed metadata
    urls = _tomllib().loads((clone / 'pyproject.toml').read_text())['project']['urls']
    assert url == urls['Source']


@pytest.mark.slow
def test_readme_demo_from_fresh_clone(fresh_install):
    bindir, clone, tmp = fresh_install
    readme = (clone / 'README.md').read_text()
    assert 'pip install .' in readme and 'synthmorph-app demo demo_out/' in readme
    out = tmp / 'demo_out'
    res = subprocess.run([str(bindir / 'synthmorph-app'), 'demo', str(out), '--nprocs', '2'],
                         cwd=tmp, env=_env(tmp), check=False, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert f'<{bindir.parent}' in res.stdout, res.stdout  # it read the installed demo data
    reports = [line.split('report:', 1)[1].strip() for line in res.stdout.splitlines()
               if 'report:' in line]
    assert sorted(Path(r).name for r in reports) == ['sub-01.html', 'sub-02.html']
    assert all(Path(r).is_file() and Path(r).parent == out for r in reports)
    for sub in ('01', '02'):
        anat = out / f'sub-{sub}' / 'anat'
        for name in (f'sub-{sub}_from-T1w_to-MNI152NLin6Asym_mode-image_xfm',
                     f'sub-{sub}_from-MNI152NLin6Asym_to-T1w_mode-image_xfm'):
            assert (anat / f'{name}.h5').is_file() and (anat / f'{name}.json').is_file()
        assert (anat / f'sub-{sub}_space-MNI152NLin6Asym_res-2_T1w.nii.gz').is_file()
        assert (out / f'sub-{sub}' / 'figures' /
                f'sub-{sub}_space-MNI152NLin6Asym_desc-reg_T1w.svg').is_file()
    desc = json.loads((out / 'dataset_description.json').read_text())
    urls = _tomllib().loads((clone / 'pyproject.toml').read_text())['project']['urls']
    assert desc['GeneratedBy'][0]['CodeURL'] == urls['Source']
    assert 'SynthMorph' in (out / 'logs' / 'CITATION.md').read_text()  # boilerplate.bib
    config = json.loads(next((out / 'logs').glob('config_*.json')).read_text())
    assert Path(config['bids_dir']).is_relative_to(bindir.parent)
    assert config['nprocs'] == 2 and config['omp_nthreads'] == 1  # two subjects side by side
