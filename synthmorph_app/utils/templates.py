"""Templates, offline: TemplateFlow homes, the packaged default and output-space specs.

Nothing here downloads. Templates come through the ``templateflow`` client from
``$TEMPLATEFLOW_HOME`` (or TemplateFlow's default home); the package ships the 2 mm
``MNI152NLin6Asym`` head T1w and its 1 mm brain mask, so the app works on a fresh machine.

TemplateFlow reads its home when it is first imported, so :func:`setup_templateflow_home` must
run before anything imports ``templateflow`` (or niworkflows' spatial utilities). It picks:

1. the user's home (``$TEMPLATEFLOW_HOME``, else TemplateFlow's default) when it already holds
   every packaged template file, unchanged;
2. otherwise an *overlay* home under the work directory: links to every ``tpl-*`` folder of the
   user's home, plus the packaged files the user's home lacks. The user's home is never written
   to, and a read-only ``$HOME`` works (as in HPC containers);
3. with no usable user home, the packaged folder itself (read-only is fine).

>>> parse_output_spaces(['MNI152NLin6Asym:res-2', 'MNI152NLin2009cAsym'])
[('MNI152NLin6Asym', {'res': '2'}), ('MNI152NLin2009cAsym', {})]
>>> space_label('MNI152NLin6Asym', {'res': '2'})
'MNI152NLin6Asym:res-2'
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from ..errors import TemplateNotFoundError

LOGGER = logging.getLogger('synthmorph_app.utils.templates')

#: The packaged TemplateFlow-layout folder.
PACKAGED_HOME = Path(__file__).resolve().parents[1] / 'data' / 'templateflow'
#: The default output space (fMRIPrep syntax).
DEFAULT_SPACE = 'MNI152NLin6Asym:res-2'

_SPEC_RE = re.compile(r'^(?P<key>[a-zA-Z]+)-(?P<value>[a-zA-Z0-9.]+)$')
#: fMRIPrep's non-standard output spaces: an image's own space, not a template.
NONSTANDARD_SPACES = ('T1w', 'T2w', 'anat', 'fsnative', 'func', 'bold', 'boldref', 'run',
                      'sbref', 'session', 'dwi', 'fmap')
_NAME_RE = re.compile(r'^[A-Za-z][A-Za-z0-9]*$')


def parse_output_spaces(specs: list[str] | None) -> list[tuple[str, dict]]:
    """Parse fMRIPrep-style output spaces: ``NAME[:key-value[:key-value]]``.

    Raises ``ValueError`` (with the offending text) for a malformed entry. Duplicates are
    dropped, order is kept.
    """
    out: list[tuple[str, dict]] = []
    for spec in specs or [DEFAULT_SPACE]:
        name, *parts = str(spec).split(':')
        if not _NAME_RE.match(name):
            raise ValueError(
                f'{spec!r} is not a template name (expected e.g. MNI152NLin6Asym:res-2)'
            )
        if name in NONSTANDARD_SPACES:
            raise ValueError(
                f'{spec!r} is one of fMRIPrep\'s non-standard spaces (an image\'s own '
                'space); --output-spaces takes TemplateFlow templates, e.g. '
                'MNI152NLin6Asym:res-2 (the inverse transforms lead back to each image)'
            )
        entities = {}
        for part in parts:
            match = _SPEC_RE.match(part)
            if not match:
                raise ValueError(
                    f'{spec!r}: {part!r} is not a key-value pair (expected e.g. res-2, cohort-1)'
                )
            entities[match['key']] = match['value']
        if 'resolution' in entities:
            entities['res'] = entities.pop('resolution')
        if 'res' in entities:
            if not entities['res'].isdigit() or int(entities['res']) == 0:
                raise ValueError(
                    f'{spec!r}: res-{entities["res"]} is not a TemplateFlow resolution: res '
                    "takes the index of one of the template's resolutions, a whole number "
                    '(res-1, res-2; see its template_description.json)'
                )
            entities['res'] = str(int(entities['res']))  # res-02 and res-2 are one space
        if (name, entities) not in out:
            out.append((name, entities))
    return out


def space_label(name: str, spec: dict) -> str:
    """The fMRIPrep spelling of a template and its specification."""
    return ':'.join([name, *(f'{k}-{v}' for k, v in spec.items())])


def user_templateflow_home() -> Path:
    """The home TemplateFlow would use: ``$TEMPLATEFLOW_HOME`` or its per-user cache folder."""
    if os.environ.get('TEMPLATEFLOW_HOME'):
        return Path(os.environ['TEMPLATEFLOW_HOME']).expanduser().absolute()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir('templateflow')).absolute()


def _packaged_files() -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for tpl_dir in sorted(PACKAGED_HOME.glob('tpl-*')):
        out[tpl_dir.name] = sorted(p for p in tpl_dir.iterdir() if p.is_file())
    return out


def _usable(path: Path) -> bool:
    """A real file (TemplateFlow's skeleton holds zero-byte placeholders)."""
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def setup_templateflow_home(work_dir: str | os.PathLike | None = None) -> Path:
    """Choose and export ``TEMPLATEFLOW_HOME`` so the packaged templates are visible offline.

    Call it before ``templateflow`` is imported. Returns the home in use. ``work_dir`` holds
    the overlay home when one is needed (default: the system's temporary folder).
    """
    user_home = user_templateflow_home()
    packaged = _packaged_files()
    try:
        user_ok = user_home.is_dir() and any(user_home.iterdir())
    except OSError:
        user_ok = False
    missing = {
        tpl: [f for f in files if not _usable(user_home / tpl / f.name)]
        for tpl, files in packaged.items()
    } if user_ok else packaged
    missing = {tpl: files for tpl, files in missing.items() if files}

    if user_ok and not missing:
        home = user_home
    elif not user_ok:
        home = PACKAGED_HOME
    else:
        home = _overlay_home(user_home, missing, work_dir)
    if 'templateflow' in sys.modules:
        from templateflow import conf

        if Path(conf.TF_HOME).absolute() != home.absolute():
            LOGGER.warning(
                'templateflow was imported before synthmorph-app set its home; it uses <%s> '
                'instead of <%s>', conf.TF_HOME, home,
            )
    os.environ['TEMPLATEFLOW_HOME'] = str(home)
    os.environ.setdefault('TEMPLATEFLOW_AUTOUPDATE', 'off')
    LOGGER.info('TemplateFlow home: %s', home)
    return home


def _overlay_home(user_home: Path, missing: dict, work_dir) -> Path:
    """Build (once, atomically) a home linking the user's templates and the packaged files."""
    base = Path(work_dir) if work_dir else Path(tempfile.gettempdir())
    key = re.sub(r'[^A-Za-z0-9]+', '_', str(user_home)).strip('_')[-60:]
    home = base / 'templateflow' / f'overlay_{key}'
    if home.is_dir():
        complete = all(_usable(home / tpl / f.name) for tpl, files in missing.items()
                       for f in files)
        if complete:
            return home
    tmp = home.parent / f'.{home.name}.{uuid.uuid4().hex}'
    tmp.mkdir(parents=True)
    for entry in sorted(user_home.iterdir()):
        if entry.name.startswith('tpl-') and entry.name not in missing:
            (tmp / entry.name).symlink_to(entry.absolute(), target_is_directory=True)
        elif entry.name.startswith('tpl-'):
            (tmp / entry.name).mkdir()
            for item in entry.iterdir():
                if _usable(item) or item.is_dir():
                    (tmp / entry.name / item.name).symlink_to(item.absolute())
        elif entry.is_file():
            (tmp / entry.name).symlink_to(entry.absolute())
    for tpl, files in missing.items():
        (tmp / tpl).mkdir(exist_ok=True)
        for src in files:
            dst = tmp / tpl / src.name
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            dst.symlink_to(src)
    try:
        if home.exists():
            shutil.rmtree(home, ignore_errors=True)
        tmp.rename(home)
    except OSError:  # another run made it first
        shutil.rmtree(tmp, ignore_errors=True)
    LOGGER.info('TemplateFlow overlay home %s (the user home <%s> lacked %s)', home, user_home,
                ', '.join(sorted(missing)))
    return home


def _missing_message(name: str, what: str) -> str:
    home = os.environ.get('TEMPLATEFLOW_HOME', str(user_templateflow_home()))
    return (
        f'The template {name} ({what}) is not available offline in the TemplateFlow home '
        f'<{home}>. synthmorph-app never downloads at run time: fetch it where there is a '
        f'network, e.g. python -c "from templateflow import api; api.get(\'{name}\')", then '
        f'point TEMPLATEFLOW_HOME at that folder (packaged: MNI152NLin6Asym:res-2).'
    )


def get_template(name: str, spec: dict | None = None, *, suffix: str = 'T1w',
                 desc: str | None = None) -> Path:
    """The path of one template file, found offline, or :class:`TemplateNotFoundError`.

    ``spec`` holds fMRIPrep entities (``res``, ``cohort``). Without ``res`` the finest
    resolution present wins. A file found is remembered for the process (each query of the
    TemplateFlow index takes about 25 ms, and a run over many images asks the same few).
    """
    key = (os.environ.get('TEMPLATEFLOW_HOME'), name, tuple(sorted((spec or {}).items())),
           suffix, desc)
    if key not in _FOUND or not _FOUND[key].is_file():
        _FOUND[key] = _find_template(name, spec, suffix=suffix, desc=desc)
    return _FOUND[key]


_FOUND: dict[tuple, Path] = {}


def _find_template(name: str, spec: dict | None, *, suffix: str, desc: str | None) -> Path:
    from templateflow import api as tf

    spec = dict(spec or {})
    query: dict = {'suffix': suffix, 'desc': desc, 'extension': ['.nii.gz', '.nii']}
    if 'cohort' in spec:
        query['cohort'] = spec['cohort']
    if 'res' in spec:
        query['resolution'] = int(float(spec['res']))
    what = ', '.join([f'{k}-{v}' for k, v in spec.items()] + [f'desc-{desc}' if desc else '',
                                                              suffix])
    what = what.strip(', ').replace(', , ', ', ')
    try:
        found = [Path(p) for p in tf.ls(name, **query)]
    except Exception as err:  # noqa: BLE001 - pybids raises many kinds for unknown entities
        raise TemplateNotFoundError(_missing_message(name, what) + f' ({err})') from None
    found = sorted((p for p in found if _usable(p)), key=lambda p: p.name)
    if not found:
        raise TemplateNotFoundError(_missing_message(name, what))
    return found[0]


def get_template_resolution(path: str | os.PathLike) -> float:
    """Voxel size (mm) of a template file."""
    import nibabel as nb

    return float(min(nb.load(str(path)).header.get_zooms()[:3]))


def get_template_metadata(name: str) -> dict:
    """The template's ``template_description.json`` (empty if absent), read offline."""
    import json

    home = Path(os.environ.get('TEMPLATEFLOW_HOME', str(PACKAGED_HOME)))
    path = home / f'tpl-{name}' / 'template_description.json'
    if not _usable(path):
        path = PACKAGED_HOME / f'tpl-{name}' / 'template_description.json'
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def template_of(space: str) -> str:
    """An output space less its resolution, which names its transform files
    (a cohort is another template).

    >>> template_of('MNIInfant:cohort-1:res-2')
    'MNIInfant:cohort-1'
    """
    return ':'.join(part for part in space.split(':') if not part.startswith('res-'))
