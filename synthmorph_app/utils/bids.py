"""BIDS input queries (pybids), derivative names and the derivatives' dataset description.

>>> entities = parse_entities('sub-01/ses-A/anat/sub-01_ses-A_run-2_T1w.nii.gz')
>>> entities
{'sub': '01', 'ses': 'A', 'run': '2', 'suffix': 'T1w'}
>>> xfm_name(entities, 'MNI152NLin6Asym')
'sub-01_ses-A_run-2_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.h5'
>>> xfm_name(entities, 'MNI152NLin6Asym', inverse=True)
'sub-01_ses-A_run-2_from-MNI152NLin6Asym_to-T1w_mode-image_xfm.h5'
>>> xfm_name(entities, 'MNI152NLin6Asym', desc='linear', ext='.lta')
'sub-01_ses-A_run-2_from-T1w_to-MNI152NLin6Asym_mode-image_desc-linear_xfm.lta'
>>> space_name(entities, 'MNI152NLin6Asym', {'res': '2'})
'sub-01_ses-A_run-2_space-MNI152NLin6Asym_res-2_T1w.nii.gz'
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import SynthMorphError

LOGGER = logging.getLogger('synthmorph_app.utils.bids')

#: Anatomical suffixes registered with ``--contrasts all``.
ANAT_CONTRASTS = ('T1w', 'T2w', 'PDw', 'FLAIR', 'T2starw', 'inplaneT1', 'inplaneT2', 'PDT2',
                  'UNIT1', 'angio')
#: Suffixes of T1-weighted images: the contrast of the (T1w) templates. An MP2RAGE UNIT1 is
#: one: as a T1w (local NCC, the asked lambda) 12 T1w with a UNI background reached mean Dice
#: 0.673 onto MNI152NLin6Asym, as another contrast (MIND, smoother) 0.656, lower on all 12
#: (``benchmarks/README.md``, "Session 31").
T1_LIKE = ('T1w', 'UNIT1', 'inplaneT1')
#: Entities of an input name kept in derivative names, in BIDS order (``flip``, ``inv``,
#: ``mt``: the images of one MP2RAGE, VFA or MTS collection differ only in them).
KEPT_ENTITIES = ('sub', 'ses', 'acq', 'ce', 'rec', 'run', 'echo', 'flip', 'inv', 'mt', 'part',
                 'chunk')
#: Entities a derivative name sets itself: an input's own are not carried over.
DERIVATIVE_ENTITIES = ('space', 'cohort', 'res', 'label', 'desc', 'from', 'to', 'mode')
#: Labels of ``[project.urls]`` (pyproject.toml) tried in turn for ``GeneratedBy.CodeURL``.
CODE_URL_LABELS = ('source', 'repository', 'homepage')
#: Derivatives outside the BIDS specification (reports, figures, group QC), for ``.bidsignore``.
BIDSIGNORE = ('*.html', 'sub-*/figures/', 'group/')


class BIDSError(SynthMorphError):
    """The input dataset is not valid BIDS (exit code 16)."""


class NothingToDoError(SynthMorphError):
    """No image matched the selection (exit code 18)."""


def parse_entities(path: str | os.PathLike) -> dict:
    """BIDS entities of a file name, in name order, plus ``suffix``."""
    name = Path(path).name
    stem = re.sub(r'\.(nii\.gz|nii|mgz|json)$', '', name)
    *pairs, suffix = stem.split('_')
    out = {}
    for pair in pairs:
        key, _, value = pair.partition('-')
        out[key] = value
    out['suffix'] = suffix
    return out


def session_t1w(path: str | os.PathLike) -> Path | None:
    """The T1w image beside ``path`` (same folder: same subject and session), or None.

    Where there are several (runs, acquisitions), the one that shares the most entities with
    ``path`` (``acq``, ``run``...) wins, then the first by name. A T1w itself gets None.
    """
    path = Path(path)
    if parse_entities(path).get('suffix') == 'T1w':
        return None
    return _closest(path, [p for p in path.parent.glob('*_T1w.nii*')
                           if re.search(r'\.nii(\.gz)?$', p.name)])


def _closest(path: Path, candidates: list[Path]) -> Path | None:
    """Of ``candidates``, those of the subject and session of ``path``; of these the one that
    shares the most entities with it, then the first by name; None if none."""
    entities = parse_entities(path)
    found = sorted(p for p in candidates
                   if all(parse_entities(p).get(k) == entities.get(k) for k in ('sub', 'ses')))
    if not found:
        return None

    def shared(p):
        other = parse_entities(p)
        return sum(other.get(k) == v for k, v in entities.items() if k != 'suffix')

    return max(found, key=shared)  # the first by name among equals


def session_lesion(path: str | os.PathLike) -> Path | None:
    """The lesion mask of the image ``path`` (a T1w), or None: a
    ``*_label-lesion_roi.nii[.gz]`` beside it (same subject and session), as fMRIPrep reads
    it; where there are several, the one that shares the most entities with ``path`` (``acq``,
    ``run``...), then the first by name."""
    path = Path(path)
    return _closest(path, [p for p in path.parent.glob('*_roi.nii*') if _is_lesion_roi(p.name)])


def image_lesion(path: str | os.PathLike, via: str | os.PathLike | None = None) -> Path | None:
    """The lesion mask the BIDS-App uses for the image ``path`` registered through ``via`` (a
    T1w) or alone: :func:`session_lesion` of the T1w (``via``, or ``path`` itself when a T1w);
    None for another contrast registered alone (the mask was drawn on the T1w)."""
    if via is not None:
        return session_lesion(via)
    return session_lesion(path) if parse_entities(path).get('suffix') == 'T1w' else None


def input_records(path: str | os.PathLike, via_t1w: bool = False,
                  known: dict | None = None) -> dict[str, dict]:
    """``{file name: {'sha256', 'size', 'mtime_ns'}}`` of the files an image's registration
    reads: the image, the T1w it goes through (``via_t1w``, where its session has one) and its
    lesion mask, if any.

    The BIDS-App records them with the derivatives (``InputFiles``), so an image replaced under
    the same name (a rescan, a corrected header) is registered again instead of skipped as
    finished. ``known``: the records of an earlier run; a file of the same size and
    modification time keeps its checksum unread (a rerun over a large dataset would otherwise
    read every image again). A file that cannot be read counts as ``'unreadable'`` (its job
    fails with its own message).

    >>> input_records('/nonexistent/sub-01_T1w.nii.gz')
    {'sub-01_T1w.nii.gz': {'sha256': 'unreadable'}}
    """
    via = session_t1w(path) if via_t1w else None
    out = {}
    for file in (Path(path), via, image_lesion(path, via)):
        if file is None:
            continue
        try:
            stat = file.stat()
        except OSError:
            out[file.name] = {'sha256': 'unreadable'}
            continue
        old = (known or {}).get(file.name) or {}
        same = (old.get('size'), old.get('mtime_ns')) == (stat.st_size, stat.st_mtime_ns)
        sha = old.get('sha256') if same and old.get('sha256') not in (None, 'unreadable') else \
            _sha256_of(str(file.resolve()), stat.st_size, stat.st_mtime_ns)
        out[file.name] = {'sha256': sha, 'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}
    return out


def input_checksums(path: str | os.PathLike, via_t1w: bool = False,
                    known: dict | None = None) -> dict[str, str]:
    """``{file name: sha256}`` of :func:`input_records` (what the registration signature
    compares)."""
    return {name: record['sha256'] for name, record in
            input_records(path, via_t1w, known).items()}


@lru_cache(maxsize=4096)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """The file's sha256, computed once per path, size and modification time."""
    import hashlib

    digest = hashlib.sha256()
    try:
        with open(path, 'rb') as stream:
            for block in iter(lambda: stream.read(1 << 20), b''):
                digest.update(block)
    except OSError:
        return 'unreadable'
    return digest.hexdigest()


def _is_lesion_roi(name: str) -> bool:
    """A lesion mask's name as fMRIPrep reads it: ``sub-X[_ses-Y]..._label-lesion_roi.nii[.gz]``
    (outside the BIDS schema: the validator rejects it, :func:`validate_dataset` accepts it)."""
    return bool(re.fullmatch(r'sub-[^_]+(_[a-zA-Z]+-[^_]+)*_label-lesion_roi\.nii(\.gz)?', name))


def _prefix(entities: dict) -> str:
    """The input's entities as derivative names begin: :data:`KEPT_ENTITIES` in BIDS order,
    then any other (outside the specification) in the input's order, so that images whose
    names differ get derivatives whose names differ."""
    other = [k for k in entities
             if k not in (*KEPT_ENTITIES, *DERIVATIVE_ENTITIES, 'suffix') and entities[k]]
    return '_'.join(f'{k}-{entities[k]}' for k in (*KEPT_ENTITIES, *other) if entities.get(k))


def xfm_name(entities: dict, template: str, *, inverse: bool = False, ext: str = '.h5',
             desc: str | None = None) -> str:
    """sMRIPrep's transform name: ``<prefix>_from-<contrast>_to-<tpl>_mode-image[_desc-X]_xfm``.

    ``desc`` goes after ``mode``, where fMRIPrep puts it (``mode-image_desc-coreg_xfm``).
    """
    src, dst = entities['suffix'], template
    if inverse:
        src, dst = dst, src
    tail = f'_desc-{desc}' if desc else ''
    return f'{_prefix(entities)}_from-{src}_to-{dst}_mode-image{tail}_xfm{ext}'


def space_name(entities: dict, template: str, spec: dict, *, desc: str | None = None,
               suffix: str | None = None, ext: str = '.nii.gz', label: str | None = None) -> str:
    """``<prefix>_space-<tpl>[_cohort-N][_res-N][_label-X][_desc-X]_<suffix><ext>``."""
    parts = [_prefix(entities), f'space-{template}']
    parts += [f'{k}-{spec[k]}' for k in ('cohort', 'res') if k in spec]
    if label:
        parts.append(f'label-{label}')
    if desc:
        parts.append(f'desc-{desc}')
    return '_'.join(parts) + f'_{suffix or entities["suffix"]}{ext}'


def image_id(entities: dict) -> str:
    """A short unique label of one input image (also a valid Nipype node name)."""
    return '_'.join([_prefix(entities), entities['suffix']]).replace('-', '').replace('.', '')


def bids_uri(path: str | os.PathLike, bids_dir: str | os.PathLike, dataset: str = 'raw') -> str:
    """``bids:<dataset>:<relative path>`` (BIDS URIs, as in ``Sources``)."""
    try:
        rel = Path(path).absolute().relative_to(Path(bids_dir).absolute())
    except ValueError:
        return Path(path).absolute().as_uri()
    return f'bids:{dataset}:{rel.as_posix()}'


def uri_name(uri: str) -> str:
    """The file name a ``Sources`` entry points to (a BIDS URI, or a ``file://`` URI)."""
    return Path(str(uri).split(':')[-1]).name


def load_bids_filters(path: str | os.PathLike | None) -> dict:
    """Read a ``--bids-filter-file``: ``{"t1w": {"session": "A"}, ...}`` keyed by contrast."""
    if not path:
        return {}
    try:
        filters = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SynthMorphError(
            f'cannot read the BIDS filter file <{path}>: {err}. It must be JSON like '
            '{"t1w": {"session": "01"}}'
        ) from None
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise SynthMorphError(
            f'the BIDS filter file <{path}> must map contrasts to entity filters, like '
            '{"t1w": {"session": "01", "acquisition": "mprage"}}'
        )
    return {k.lower(): v for k, v in filters.items()}


def read_bidsignore(root: str | os.PathLike) -> list[str]:
    """The patterns of ``<root>/.bidsignore`` (none where there is no such file)."""
    try:
        text = (Path(root) / '.bidsignore').read_text()
    except OSError:
        return []
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith('#')]


def bidsignored(rel: str, patterns: list[str]) -> bool:
    """Whether the path ``rel`` (relative to the dataset root, ``/``-separated) matches a
    ``.bidsignore`` pattern (gitignore-like: ``dir/`` ignores a folder and all it holds, a
    pattern without ``/`` matches a name at any level, one with ``/`` the path from the root).
    """
    from fnmatch import fnmatch

    rel = rel.lstrip('/')
    parts = rel.split('/')
    for pattern in patterns:
        folder = pattern.endswith('/')
        pat = pattern.strip('/')
        if not pat:
            continue
        # the folders holding rel for a folder pattern; rel itself and its folders otherwise
        names = parts[:-1] if folder else parts
        if '/' in pat:
            depth = pat.count('/') + 1
            if len(names) >= depth and fnmatch('/'.join(parts[:depth]), pat):
                return True
        elif any(fnmatch(name, pat) for name in names):
            return True
    return False


def validate_dataset(bids_dir: str | os.PathLike,
                     participant_labels: list[str] | None = None) -> None:
    """Check that ``bids_dir`` looks like BIDS: a dataset description and valid names.

    A light check (the full validator is the npm package ``bids-validator``): the
    ``dataset_description.json`` must be JSON with ``Name`` and ``BIDSVersion``, and every file
    under ``sub-*/`` (the folders of ``participant_labels`` only, where given: a misnamed file of
    another subject does not stop this one's job) must have a name the BIDS schema accepts,
    unless ``.bidsignore`` lists it or it is a lesion mask as fMRIPrep reads them
    (``*_label-lesion_roi.nii.gz``). Raises :class:`BIDSError`.
    """
    root = Path(bids_dir)
    desc = root / 'dataset_description.json'
    if not root.is_dir():
        raise BIDSError(f'The BIDS dataset <{root}> does not exist or is not a directory.')
    try:
        meta = json.loads(desc.read_text())
    except OSError:
        raise BIDSError(
            f'<{desc}> is missing: <{root}> is not a BIDS dataset (give the dataset root, '
            'or --skip-bids-validation).'
        ) from None
    except ValueError as err:
        raise BIDSError(f'<{desc}> is not valid JSON: {err}.') from None
    for key in ('Name', 'BIDSVersion'):
        if key not in meta:
            raise BIDSError(f'<{desc}> lacks the required field "{key}".')
    try:
        from bids_validator import BIDSValidator
    except ImportError:  # pragma: no cover - pybids depends on it
        return
    validator = BIDSValidator()
    ignore = read_bidsignore(root)
    bad = []
    folders = [f'sub-{re.sub(r"^sub-", "", s)}' for s in participant_labels or []] or ['sub-*']
    for path in sorted(p for folder in folders for p in root.glob(f'{folder}/**/*')):
        if path.is_file() and not path.name.startswith('.'):
            rel = path.relative_to(root).as_posix()
            if not (validator.is_bids('/' + rel) or _is_lesion_roi(path.name)
                    or bidsignored(rel, ignore)):
                bad.append('/' + rel)
    if bad:
        shown = ', '.join(f'<{root}{p}>' for p in bad[:5])
        more = f' and {len(bad) - 5} more' if len(bad) > 5 else ''
        raise BIDSError(
            f'files with non-BIDS names: {shown}{more}. Rename them, add them to .bidsignore, '
            'or run with --skip-bids-validation.'
        )


@dataclass
class Selection:
    """What :func:`collect_data` found.

    ``images``: the anatomical images to register, by subject label. ``missing``: the selected
    subjects with no image of the asked contrasts, each with the anatomical files it does have
    (names), so that the message can say what is there instead. ``sessions``: the selected
    session labels without their ``ses-`` prefix (empty for all sessions). ``filtered``: whether
    a BIDS filter narrowed the query of an asked contrast. ``unknown``: participant labels asked
    for that the dataset does not have; ``subjects``: the labels it has.
    """

    images: dict[str, list[Path]]
    missing: dict[str, list[str]] = field(default_factory=dict)
    sessions: list[str] = field(default_factory=list)
    filtered: bool = False
    unknown: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)


def dataset_subjects(bids_dir: str | os.PathLike) -> list[str]:
    """Subject labels of a dataset: its ``sub-*`` folders (without ``sub-``), sorted."""
    return sorted(p.name[4:] for p in Path(bids_dir).glob('sub-*') if p.is_dir())


def _layout(bids_dir, subjects: list[str] | None):
    """A pybids layout of ``subjects`` only (None: all), sidecar metadata indexed (a filter
    file may select by it).

    The other subjects' folders, ``derivatives/``, ``sourcedata/`` and the like are not
    walked: an array job over one subject of a large dataset indexes that subject and the
    top-level files (2,000 subjects: 100 s and 0.6 GB for the whole dataset). A sidecar that
    is not JSON would stop pybids: it is named in a warning and the subjects indexed without
    metadata instead (the registration reads none).
    """
    from bids import BIDSLayout, BIDSLayoutIndexer

    ignore = [re.compile(r'^/(code|models|sourcedata|stimuli|derivatives)(/|$)')]
    if subjects is not None:  # a selection (all subjects: no pattern to test every path on)
        chosen = '|'.join(re.escape(s) for s in subjects)
        ignore.append(re.compile(rf'^/sub-(?!({chosen})(/|$))'))

    def layout(metadata: bool):
        indexer = BIDSLayoutIndexer(validate=False, ignore=ignore, index_metadata=metadata)
        return BIDSLayout(str(bids_dir), validate=False, derivatives=False, indexer=indexer)

    try:
        return layout(metadata=True)
    except OSError as err:
        if 'decode JSON' not in str(err):
            raise BIDSError(f'pybids cannot index <{bids_dir}>: {err}') from None
        found = re.search(r"filename='([^']+)'", str(err))
        LOGGER.warning('the sidecar <%s> is not valid JSON: sidecar metadata are not indexed '
                       '(--bids-filter-file can select by BIDS entities only)',
                       found.group(1) if found else err)
        return layout(metadata=False)


def _check_filter_keys(layout, filters: dict, bids_dir) -> None:
    """Refuse a filter key that is neither an entity nor a sidecar field of the dataset
    (pybids would raise deep in its query), naming the key and what the dataset has."""
    known = set(layout.get_entities())
    for contrast, filt in filters.items():
        unknown = sorted(set(filt) - known)
        if unknown:
            entities = sorted(layout.get_entities(metadata=False))
            raise SynthMorphError(
                f'--bids-filter-file: {contrast.lower()}: {", ".join(map(repr, unknown))} '
                f'is neither a BIDS entity nor a sidecar field of <{bids_dir}> (its entities: '
                f'{", ".join(entities)}; entities go by their long names, e.g. '
                f'"acquisition", not "acq")'
            )


def collect_data(
    bids_dir: str | os.PathLike,
    *,
    participant_labels: list[str] | None = None,
    session_labels: list[str] | None = None,
    contrasts: list[str] | None = None,
    bids_filters: dict | None = None,
) -> Selection:
    """Anatomical images to register, by subject label, queried with pybids.

    ``contrasts`` are BIDS suffixes (default ``['T1w']``; ``['all']`` for every anatomical
    contrast in :data:`ANAT_CONTRASTS`). Labels may carry the ``sub-``/``ses-`` prefix.
    Selected subjects without such an image are listed in ``missing``, labels the dataset does
    not have in ``unknown``. Raises :class:`NothingToDoError` when nothing matches, naming what
    was asked.
    """
    from bids.layout import Query

    subjects = dataset_subjects(bids_dir)
    wanted = [re.sub(r'^sub-', '', s) for s in participant_labels or []] or subjects
    unknown = sorted(set(wanted) - set(subjects))
    if unknown:
        msg = (f'participant label(s) {", ".join(unknown)} not found in <{bids_dir}> '
               f'(it has: {", ".join(subjects) or "none"})')
        if len(unknown) == len(wanted):
            raise NothingToDoError(msg)
    wanted = [s for s in wanted if s in subjects]
    layout = _layout(bids_dir, wanted if participant_labels else None)
    contrasts = list(contrasts or ['T1w'])
    if 'all' in contrasts:
        contrasts = list(ANAT_CONTRASTS)
    # each asked contrast's filter (keyed by its lower-case suffix), less the entities that
    # --participant-label and --contrasts choose; contrasts left with none are not filtered
    filters = {c: filt for c in contrasts
               if (filt := {k: v for k, v in (bids_filters or {}).get(c.lower(), {}).items()
                            if k not in ('subject', 'datatype', 'suffix', 'return_type')})}
    _check_filter_keys(layout, filters, bids_dir)
    session_labels = [re.sub(r'^ses-', '', s) for s in session_labels or []]
    sessions = {'session': session_labels} if session_labels else {}
    out: dict[str, list[Path]] = {}
    missing: dict[str, list[str]] = {}
    for sub in wanted:
        # the subject's anatomical images in the selected sessions
        anat = {'subject': sub, 'datatype': 'anat', 'extension': ['.nii', '.nii.gz'],
                'return_type': 'file', **sessions}
        images: list[Path] = []
        for contrast in contrasts:
            query = {**anat, 'suffix': contrast}
            for key, value in filters.get(contrast, {}).items():
                query[key] = Query.NONE if value is None else value
            images += [Path(p) for p in layout.get(**query)]
        if images:
            out[sub] = sorted(set(images))
        else:
            missing[sub] = sorted(Path(p).name for p in layout.get(**anat))
    if not out:
        raise NothingToDoError(
            f'no {"/".join(contrasts)} image in <{bids_dir}> matches the selection '
            f'(participants: {", ".join(wanted) or "none"}'
            + (f'; sessions: {", ".join(session_labels)}' if session_labels else '')
            + '); check --participant-label, --session-label, --contrasts and '
            '--bids-filter-file.'
        )
    return Selection(out, missing, session_labels, bool(filters), unknown, subjects)


def in_container() -> dict | None:
    """Container metadata for ``GeneratedBy``, or None outside one."""
    if os.environ.get('SINGULARITY_CONTAINER') or os.environ.get('APPTAINER_CONTAINER'):
        return {'Type': 'singularity',
                'Tag': os.environ.get('SINGULARITY_NAME') or os.environ.get('APPTAINER_NAME')}
    if Path('/.dockerenv').exists() or os.environ.get('IS_DOCKER_8395080871'):
        return {'Type': 'docker', 'Tag': f'synthmorph-app:{_version()}'}
    return None


def _version() -> str:
    from .. import __version__

    return __version__


@lru_cache
def code_url() -> str | None:
    """The project's source URL, from ``[project.urls]`` in ``pyproject.toml``.

    Read from the installed package's metadata (``Project-URL``, through
    :mod:`importlib.metadata`); when that has none (an editable install older than the entry),
    from the ``pyproject.toml`` of a source checkout; else None, and ``GeneratedBy`` goes
    without a ``CodeURL`` (recommended, not required, by BIDS) rather than with a made-up one.
    The first of :data:`CODE_URL_LABELS` found wins.
    """
    from importlib import metadata

    urls: dict[str, str] = {}
    try:
        for entry in metadata.metadata('synthmorph-app').get_all('Project-URL') or []:
            label, _, url = entry.partition(',')
            urls[label.strip().lower()] = url.strip()
    except metadata.PackageNotFoundError:
        pass
    if not urls:
        urls = _pyproject_urls(Path(__file__).resolve().parents[2] / 'pyproject.toml')
    return next((urls[k] for k in CODE_URL_LABELS if urls.get(k)), None)


def _pyproject_urls(path: Path) -> dict[str, str]:
    """``[project.urls]`` of a source checkout's ``pyproject.toml`` (labels lower-cased)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return {}
    try:
        project = tomllib.loads(path.read_text()).get('project', {})
    except (OSError, ValueError):
        return {}
    if project.get('name') != 'synthmorph-app':
        return {}
    return {k.lower(): v for k, v in project.get('urls', {}).items()}


def dataset_description(bids_dir: str | os.PathLike) -> dict:
    """The derivatives' ``dataset_description.json`` (deterministic for one version)."""
    generated = {'Name': 'synthmorph-app', 'Version': _version()}
    if code_url():
        generated['CodeURL'] = code_url()
    container = in_container()
    if container:
        generated['Container'] = {k: v for k, v in container.items() if v}
    return {
        'Name': 'synthmorph-app: anatomical images registered to templates',
        'BIDSVersion': '1.9.0',
        'DatasetType': 'derivative',
        'GeneratedBy': [generated],
        'HowToAcknowledge': 'Cite SynthMorph and synthmorph-app: see logs/CITATION.md.',
        # the dataset names of the sidecars' BIDS URIs (bids:raw:..., bids:templateflow:...),
        # as fMRIPrep defines them
        'DatasetLinks': {'raw': str(Path(bids_dir).absolute()),
                         'templateflow': 'https://github.com/templateflow/templateflow'},
    }


def write_json_atomic(path: str | os.PathLike, data: dict) -> Path:
    """Write JSON through a unique temporary name and ``os.replace`` (safe when concurrent)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f'.{path.name}.{uuid.uuid4().hex}.tmp'
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + '\n')
    os.replace(tmp, path)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text through a unique temporary name and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f'.{path.name}.{uuid.uuid4().hex}.tmp'
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def foreign_dataset(out_dir: str | os.PathLike) -> str | None:
    """What other dataset ``out_dir`` holds (its ``dataset_description.json`` is not one
    synthmorph-app wrote: raw data, another pipeline's derivatives), or None (no description,
    or ours)."""
    path = Path(out_dir) / 'dataset_description.json'
    if not path.is_file():
        return None
    try:
        desc = json.loads(path.read_text())
    except (OSError, ValueError):
        return f'a dataset_description.json that is not JSON (<{path}>)'
    if not isinstance(desc, dict):
        return f'a dataset_description.json that is not a JSON object (<{path}>)'
    generated = [g for g in desc.get('GeneratedBy') or [] if isinstance(g, dict)]
    if desc.get('DatasetType') == 'derivative' and generated and \
            generated[0].get('Name') == 'synthmorph-app':
        return None
    who = ', '.join(' '.join(str(g[k]) for k in ('Name', 'Version') if g.get(k))
                    for g in generated)
    kind = desc.get('DatasetType') or 'raw'
    return (f'a {kind} dataset ({who or desc.get("Name") or "unnamed"}; '
            f'<{path}>)')


def write_dataset_description(out_dir: str | os.PathLike, bids_dir: str | os.PathLike) -> Path:
    """Write ``<out_dir>/dataset_description.json`` and ``.bidsignore`` atomically.

    Concurrent runs write the same content, so either write wins. ``.bidsignore`` lists the
    files that BIDS does not specify (:data:`BIDSIGNORE`: HTML reports, their figures, the
    group QC), so the BIDS validator checks only the derivatives themselves; lines already
    there (a user's own) are kept.
    """
    ignore = Path(out_dir) / '.bidsignore'
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    lines += [line for line in BIDSIGNORE if line not in lines]
    write_text_atomic(ignore, '\n'.join(lines) + '\n')
    return write_json_atomic(Path(out_dir) / 'dataset_description.json',
                             dataset_description(bids_dir))
