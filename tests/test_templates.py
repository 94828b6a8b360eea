"""Templates offline: the packaged default, overlay homes, read-only HOME, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from synthmorph_app.utils import templates as T


def test_parse_output_spaces():
    assert T.parse_output_spaces(None) == [('MNI152NLin6Asym', {'res': '2'})]
    assert T.parse_output_spaces(['MNI152NLin2009cAsym:res-1', 'MNIInfant:cohort-1:res-2',
                                  'MNI152NLin2009cAsym:res-1']) == [
        ('MNI152NLin2009cAsym', {'res': '1'}), ('MNIInfant', {'cohort': '1', 'res': '2'})]
    for bad in ('MNI:res2', '2MNI', 'MNI:res-'):
        with pytest.raises(ValueError, match='expected'):
            T.parse_output_spaces([bad])
    # TemplateFlow's res is an index: res-02 is res-2 (one space, one derivative name);
    # fMRIPrep's res-native and a size in mm are refused by name, not a traceback later
    assert T.parse_output_spaces(['MNI152NLin6Asym:res-02', 'MNI152NLin6Asym:res-2']) == [
        ('MNI152NLin6Asym', {'res': '2'})]
    for bad in ('MNI152NLin6Asym:res-native', 'MNI152NLin6Asym:res-2.5', 'MNI:res-0'):
        with pytest.raises(ValueError, match='not a TemplateFlow resolution'):
            T.parse_output_spaces([bad])
    with pytest.raises(ValueError, match="non-standard spaces"):
        T.parse_output_spaces(['T1w'])


def _probe(env_extra: dict, tmp_path, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ('TEMPLATEFLOW_HOME',
                                                             'XDG_CACHE_HOME')}
    env.update(env_extra)
    return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, check=False,
                          text=True, timeout=120, cwd=tmp_path)


SETUP = ('from synthmorph_app.utils.templates import *; import sys; '
         'home = setup_templateflow_home(sys.argv[-1] if len(sys.argv) > 1 else None); '
         'print(home); print(get_template("MNI152NLin6Asym", {"res": "2"})); '
         'print(get_template("MNI152NLin6Asym", {"res": "1"}, suffix="mask", desc="brain"))')


def test_read_only_home_without_templateflow_home(tmp_path):
    """HOME unwritable (even for root: /proc), TEMPLATEFLOW_HOME unset: the package serves."""
    res = _probe({'HOME': '/proc/no-home'}, tmp_path, SETUP)
    assert res.returncode == 0, res.stderr
    home, t1w, mask = res.stdout.split()
    assert home == str(T.PACKAGED_HOME)
    assert t1w.endswith('tpl-MNI152NLin6Asym_res-02_T1w.nii.gz') and mask.endswith('mask.nii.gz')


def test_user_home_lacking_the_template_gets_an_overlay(tmp_path):
    user = tmp_path / 'tf'
    (user / 'tpl-Other').mkdir(parents=True)
    (user / 'tpl-Other' / 'template_description.json').write_text('{}')
    res = _probe({'HOME': '/proc/no-home', 'TEMPLATEFLOW_HOME': str(user),
                  'TMPDIR': str(tmp_path)}, tmp_path, SETUP)
    assert res.returncode == 0, res.stderr
    home = res.stdout.split()[0]
    assert home.startswith(str(tmp_path)) and home != str(user)
    assert os.path.islink(os.path.join(home, 'tpl-Other'))
    assert sorted(p.name for p in user.iterdir()) == ['tpl-Other']  # user home untouched


def test_complete_user_home_is_used_as_is(tmp_path, shared_data):
    home = shared_data / 'templateflow'
    res = _probe({'TEMPLATEFLOW_HOME': str(home)}, tmp_path, SETUP)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == str(home)


def test_missing_template_says_how_to_provide_it(tmp_path):
    code = ('from synthmorph_app.utils.templates import *; setup_templateflow_home(); '
            'get_template("MNI152NLin2009cAsym", {"res": "1"})')
    res = _probe({'HOME': '/proc/no-home'}, tmp_path, code)
    assert res.returncode == 1
    assert 'TemplateNotFoundError' in res.stderr and 'TEMPLATEFLOW_HOME' in res.stderr
    assert 'MNI152NLin2009cAsym' in res.stderr
