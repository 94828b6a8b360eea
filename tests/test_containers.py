"""Container recipes and citation metadata, checked without a container engine.

No Docker daemon or Apptainer runs here, so: hadolint lints the ``Dockerfile``,
dockerfile-parse reads it and we check what matters (stages, entry point, non-root user, the
baked ``TEMPLATEFLOW_HOME``, templates fetched at build time); ``singularity.def`` is parsed by
spython (which accepts invalid files) and by our own section reader, and its ``%test`` script
runs here against the installed package and a TemplateFlow home laid out like the image's;
``cffconvert --validate`` checks ``CITATION.cff``.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / 'Dockerfile'
DEFFILE = REPO / 'singularity.def'
FETCH = REPO / 'scripts' / 'fetch_templates.py'
PACKAGED_TF = REPO / 'synthmorph_app' / 'data' / 'templateflow'
#: Sections Apptainer knows (``%app*`` sections aside).
DEF_SECTIONS = {'setup', 'files', 'environment', 'post', 'runscript', 'startscript', 'test',
                'labels', 'help', 'arguments'}


def _tool(name: str) -> str:
    """The tool from this interpreter's environment, else from PATH (skip when absent)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.skip(f'{name} is not installed (pip install -e ".[test]")')
    return found


def _fetch_module():
    spec = importlib.util.spec_from_file_location('fetch_templates', FETCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------
def test_hadolint():
    proc = subprocess.run([_tool('hadolint'), '--failure-threshold', 'warning', str(DOCKERFILE)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # every inline ignore is justified by a comment right above it
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if 'hadolint ignore' in line:
            above = lines[i - 1].strip() if i else ''
            assert above.startswith('#') and 'hadolint' not in above and len(above) > 10, line


@pytest.fixture(scope='module')
def stages() -> list[list[dict]]:
    """The Dockerfile's instructions, one list per stage (comments dropped)."""
    dockerfile_parse = pytest.importorskip('dockerfile_parse')
    parser = dockerfile_parse.DockerfileParser(path=str(DOCKERFILE))
    out: list[list[dict]] = [[]]
    for item in parser.structure:
        if item['instruction'] == 'FROM':
            out.append([])
        if item['instruction'] != 'COMMENT':
            out[-1].append(item)
    return out[1:]


def _values(stage: list[dict], instruction: str) -> list[str]:
    return [item['value'] for item in stage if item['instruction'] == instruction]


def _env(stage: list[dict]) -> dict:
    env = {}
    for value in _values(stage, 'ENV'):
        for key, val in re.findall(r'(\w+)=("[^"]*"|\S+)', value):
            env[key] = val.strip('"')
    return env


def test_dockerfile_is_multistage(stages):
    assert len(stages) == 2
    builder, runtime = stages
    assert _values(builder, 'FROM')[0].endswith(' AS builder')
    # the runtime stage takes only the venv and the templates from the builder, builds nothing
    copies = _values(runtime, 'COPY')
    assert copies and all(c.startswith('--from=builder ') for c in copies)
    assert {c.split()[1] for c in copies} == {'/opt/venv', '/opt/templateflow'}
    runs = ' '.join(_values(runtime, 'RUN'))
    for word in ('pip ', 'apt-get', 'gcc', 'build-essential', 'git ', 'fetch_templates'):
        assert word not in runs, word
    # the app is built from this repository as a wheel, with the version passed in
    build = ' '.join(_values(builder, 'RUN'))
    assert 'pip wheel' in build and 'SETUPTOOLS_SCM_PRETEND_VERSION' in build
    assert 'pip install /dist/synthmorph_app-' in build


def test_dockerfile_entrypoint_and_user(stages):
    runtime = stages[-1]
    entrypoint = json.loads(_values(runtime, 'ENTRYPOINT')[-1])  # exec form
    assert Path(entrypoint[0]).name == 'synthmorph-app' and len(entrypoint) == 1
    user = _values(runtime, 'USER')[-1]
    name, _, group = user.partition(':')
    assert name not in ('root', '0') and group not in ('root', '0')
    uid = re.search(r'useradd .*--uid (\d+)', ' '.join(_values(runtime, 'RUN')))
    assert uid and uid.group(1) != '0' and name in (uid.group(1), 'synthmorph')
    # the last instruction that sets the user is after every RUN: the app never runs as root
    kinds = [item['instruction'] for item in runtime]
    assert max(i for i, k in enumerate(kinds) if k == 'RUN') < kinds.index('USER')


def test_dockerfile_templates_baked_at_build_time(stages):
    builder, runtime = stages
    env = _env(runtime)
    home = env['TEMPLATEFLOW_HOME']
    assert home == _env(builder)['TEMPLATEFLOW_HOME'] == '/opt/templateflow'
    assert env['TEMPLATEFLOW_AUTOUPDATE'] == 'off'
    # fetched by a RUN of the build stage, into that home ...
    fetch_runs = [r for r in _values(builder, 'RUN') if 'fetch_templates.py' in r]
    assert fetch_runs and '--tf-dir "${TEMPLATEFLOW_HOME}"' in fetch_runs[0]
    assert any('scripts/fetch_templates.py' in c for c in _values(builder, 'COPY'))
    # ... copied into the runtime stage, world-readable for Singularity's users ...
    assert f'--from=builder {home} {home}' in _values(runtime, 'COPY')
    assert any('a+rX' in r and home.split('/')[-1] in r.replace('${TEMPLATEFLOW_HOME}', home)
               for r in _values(builder, 'RUN'))
    # ... and nothing at run time fetches: the entry point is the CLI itself
    for value in _values(runtime, 'ENTRYPOINT') + _values(runtime, 'CMD'):
        assert 'fetch' not in value and 'templateflow' not in value.lower()


def test_dockerfile_runtime_environment(stages):
    env = _env(stages[-1])
    assert env['NIPYPE_NO_ET'] == '1'
    assert env['OMP_NUM_THREADS'] == env['MKL_NUM_THREADS'] == '1'  # threads pinned
    assert env['PATH'].startswith('/opt/venv/bin')
    assert env['MPLCONFIGDIR'].startswith('/tmp')  # writable with a read-only root
    labels = ' '.join(_values(stages[-1], 'LABEL'))
    for key in ('version', 'source', 'licenses', 'revision', 'created', 'title'):
        assert f'org.opencontainers.image.{key}=' in labels, key
    pyproject = (REPO / 'pyproject.toml').read_text()
    license_ = re.search(r'^license = "([^"]+)"', pyproject, re.MULTILINE)
    assert f'org.opencontainers.image.licenses="{license_.group(1)}"' in labels


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics, enough for our allow-list (last match wins)."""
    ignored = False
    parts = path.split('/')
    for pattern in patterns:
        negate = pattern.startswith('!')
        pat = pattern.lstrip('!').rstrip('/')
        prefixes = ['/'.join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace('**/', ''))
               for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_build_copies(stages):
    patterns = [ln.strip() for ln in (REPO / '.dockerignore').read_text().splitlines()
                if ln.strip() and not ln.startswith('#')]
    for value in _values(stages[0], 'COPY'):
        for src in value.split()[:-1]:
            for path in ([src] if (REPO / src).is_file() else
                         [str(p.relative_to(REPO)) for p in (REPO / src).rglob('*.py')
                          if '__pycache__' not in p.parts and p.name != '_version.py'][:20]):
                assert (REPO / path).exists(), path
                assert not _ignored(path, patterns), f'{path} is excluded by .dockerignore'
    for junk in ('.git/HEAD', 'tests/conftest.py', '.venv/bin/python',
                 'synthmorph_app/__pycache__/x.pyc', 'benchmarks/bench_register.py'):
        assert _ignored(junk, patterns), junk


# ---------------------------------------------------------------------------------------------
# the build-time template fetcher
# ---------------------------------------------------------------------------------------------
def test_fetch_templates_covers_the_defaults():
    fetch = _fetch_module()
    from synthmorph_app.utils.templates import DEFAULT_SPACE, parse_output_spaces

    name, _ = parse_output_spaces([DEFAULT_SPACE])[0]
    assert {'MNI152NLin6Asym', 'MNI152NLin2009cAsym'} == set(fetch.TEMPLATES) | {name}
    for tpl, queries in fetch.TEMPLATES.items():
        got = {(q['resolution'], q['suffix'], q['desc']) for q in queries}
        assert {(r, 'T1w', None) for r in (1, 2)} | {(r, 'mask', 'brain') for r in (1, 2)} \
            <= got, tpl
    # the files the app ships are among those fetched, under the same names
    names = {p.name for p in fetch.expected_files(Path('/h'))}
    assert {p.name for p in PACKAGED_TF.rglob('*') if p.is_file()} <= names


def _image_like_home(root: Path) -> Path:
    """A TemplateFlow home with every file the image bakes in. Files the package ships are
    copied; the others are stand-ins (the packaged MNI152NLin6Asym images under the other
    names), enough for lookups and dry runs."""
    fetch = _fetch_module()
    t1w = PACKAGED_TF / 'tpl-MNI152NLin6Asym' / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz'
    mask = next(PACKAGED_TF.glob('tpl-MNI152NLin6Asym/*_desc-brain_mask.nii.gz'))
    for path in fetch.expected_files(root):
        path.parent.mkdir(parents=True, exist_ok=True)
        packaged = PACKAGED_TF / path.parent.name / path.name
        if packaged.is_file():
            shutil.copy(packaged, path)
        elif path.name == 'template_description.json':
            tpl = path.parent.name[4:]
            path.write_text(json.dumps({'Name': f'{tpl} (test stand-in)', 'Identifier': tpl}))
        else:
            shutil.copy(mask if path.name.endswith('_mask.nii.gz') else t1w, path)
    return root


def test_fetch_templates_check_and_prune(tmp_path):
    fetch = _fetch_module()
    home = _image_like_home(tmp_path / 'tf')
    proc = subprocess.run([sys.executable, str(FETCH), '--check', '--tf-dir', str(home)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    # TemplateFlow's zero-byte placeholders do not count, and prune() removes them along
    # with the templates the image does not ship
    target = home / 'tpl-MNI152NLin2009cAsym' / 'tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz'
    target.write_bytes(b'')
    (home / 'tpl-Other').mkdir()
    (home / 'tpl-Other' / 'tpl-Other_T1w.nii.gz').write_bytes(b'')
    proc = subprocess.run([sys.executable, str(FETCH), '--check', '--tf-dir', str(home)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and str(target) in proc.stderr
    fetch.prune(home, keep=list(fetch.TEMPLATES))
    assert not target.exists() and not (home / 'tpl-Other').exists()
    assert fetch.missing_files(home) == [target]
    # without a home it refuses rather than filling ~/.cache
    env = {k: v for k, v in os.environ.items() if k != 'TEMPLATEFLOW_HOME'}
    proc = subprocess.run([sys.executable, str(FETCH), '--check'], env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and 'TEMPLATEFLOW_HOME' in proc.stderr


# ---------------------------------------------------------------------------------------------
# singularity.def
# ---------------------------------------------------------------------------------------------
def _def_sections() -> tuple[dict, dict[str, str]]:
    """``(header, {section: body})`` of singularity.def, read by hand."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in DEFFILE.read_text().splitlines():
        match = re.match(r'^%(\w+)\s*$', line)
        if match:
            current = match.group(1)
            assert current not in sections, f'%{current} appears twice'
            sections[current] = []
        elif current is None:
            kv = re.match(r'^(\w+):\s*(\S.*)$', line)
            if kv:
                header[kv.group(1)] = kv.group(2).strip()
        else:
            sections[current].append(line)
    return header, {k: '\n'.join(v).strip('\n') for k, v in sections.items()}


def _exports(body: str) -> dict:
    return dict(re.findall(r'^\s*export (\w+)=(\S+)$', body, re.MULTILINE))


def test_singularity_def_parses_with_spython():
    parsers = pytest.importorskip('spython.main.parse.parsers')
    recipe = next(iter(parsers.SingularityParser(str(DEFFILE)).recipe.values()))
    assert recipe.fromHeader == 'synthmorph-app:latest'
    assert 'synthmorph-app "$@"' in recipe.cmd
    assert any(lab.startswith('org.opencontainers.image.licenses') for lab in recipe.labels)
    assert 'TEMPLATEFLOW_HOME=/opt/templateflow' in recipe.environ
    assert recipe.test


def test_singularity_def_sections(stages):
    header, sections = _def_sections()
    assert header == {'Bootstrap': 'docker-daemon', 'From': 'synthmorph-app:latest'}
    assert set(sections) <= DEF_SECTIONS, set(sections) - DEF_SECTIONS
    assert {'labels', 'environment', 'runscript', 'test', 'help'} <= set(sections)
    # %runscript hands every argument, quoted, to the CLI
    runscript = [ln.strip() for ln in sections['runscript'].splitlines() if ln.strip()]
    assert runscript == ['exec /opt/venv/bin/synthmorph-app "$@"']
    # %environment restates the image's run-time variables (kept under --cleanenv)
    env = _exports(sections['environment'])
    docker_env = _env(stages[-1])
    for key in ('TEMPLATEFLOW_HOME', 'TEMPLATEFLOW_AUTOUPDATE', 'NIPYPE_NO_ET', 'MPLCONFIGDIR',
                'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
        assert env[key] == docker_env[key], key
    assert env['PATH'].startswith('/opt/venv/bin:')
    labels = dict(ln.strip().split(None, 1) for ln in sections['labels'].splitlines()
                  if ln.strip())
    assert labels['org.opencontainers.image.licenses'] == 'Apache-2.0'
    help_text = sections['help']
    for word in ('--nv', '--cleanenv', '--containall', '-B', 'apptainer test'):
        assert word in help_text, word
    assert 'synthmorph-app' in sections['test'] and '--dry-run' in sections['test']
    assert 'self-check passed' in sections['test']


@pytest.mark.slow
def test_singularity_def_self_check_runs(tmp_path, stages):
    """Run %test as Apptainer would, with /opt/venv as this environment and an image-like
    TemplateFlow home: offline, with a read-only HOME."""
    venv_bin = Path(sys.executable).parent
    if not (venv_bin / 'synthmorph-app').exists():
        pytest.skip(f'synthmorph-app is not installed beside {sys.executable}')
    _, sections = _def_sections()
    script = sections['test'].replace('/opt/venv/bin/', f'{venv_bin}/')
    script = script.replace("'/tmp'", f"'{tmp_path}'").replace('/tmp/', f'{tmp_path}/')
    env = {k: v for k, v in os.environ.items() if k not in ('XDG_CACHE_HOME',)}
    env.update(_exports(sections['environment']))
    env.update(PATH=f'{venv_bin}:{os.environ["PATH"]}', HOME='/proc/synthmorph-no-home',
               TEMPLATEFLOW_HOME=str(_image_like_home(tmp_path / 'templateflow')),
               MPLCONFIGDIR=str(tmp_path / 'mpl'))
    proc = subprocess.run(['bash', '-c', script], env=env, capture_output=True, text=True,
                          check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert 'self-check passed' in proc.stdout
    assert 'MNI152NLin2009cAsym:res-1' in proc.stdout and 'sub-02' in proc.stdout


# ---------------------------------------------------------------------------------------------
# CITATION.cff
# ---------------------------------------------------------------------------------------------
def test_citation_cff_validates():
    proc = subprocess.run([_tool('cffconvert'), '--validate', '-i', str(REPO / 'CITATION.cff')],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_boilerplate_cites_citation_cff():
    """The methods text cites what CITATION.cff asks for: the paper and the software."""
    cff = (REPO / 'CITATION.cff').read_text()
    title = re.search(r'^title: "(.+)"$', cff, re.MULTILINE).group(1)
    dois = re.findall(r'doi: (\S+)', cff)
    preferred = re.search(r'preferred-citation:.*?doi: (\S+)', cff, re.DOTALL).group(1)

    from synthmorph_app.utils.templates import setup_templateflow_home

    setup_templateflow_home()
    from synthmorph_app.reports.boilerplate import citation_markdown

    text, bib = citation_markdown(['MNI152NLin6Asym:res-2'])
    assert preferred in bib and all(doi in bib for doi in dois)
    assert f'title = {{{title}}}' in bib  # the software entry, as CITATION.cff names it
    assert '[@synthmorphapp]' in text and title in text
