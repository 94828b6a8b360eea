"""Model weights: our ``.pt`` + ``.json`` model cards, packaged models, official Keras files.

Our format
----------
A model ``<name>`` is two files side by side:

* ``<name>.pt``: the network's ``state_dict`` (``torch.save``), loaded with
  ``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)``;
* ``<name>.json``: its model card: ``format`` (``'synthmorph-app-weights'``),
  ``format_version`` (:data:`FORMAT_VERSION`), ``kind`` ('affine' | 'rigid' | 'deform'),
  ``arch``, ``config`` (the network's ``config``, with ``'arch'``), ``space`` (the network grid:
  ``voxel_size`` mm, ``shape``, and ``divisor``, what every grid size must be a multiple of),
  ``trained`` (bool), ``training`` (provenance: data, steps, hardware, validation figures...),
  ``parameters`` (count), ``sha256`` (of the ``.pt`` file), ``torch_version``, and whatever else
  the writer adds.

Where models are found (:func:`load_model`)
-------------------------------------------
``spec`` is a model name or a path. A path (anything with a suffix or a path separator, or an
existing file) names our ``.pt`` or ``.json`` (or their common stem), or an official Keras
``.h5`` file (:mod:`.keras`). A name is looked up first in the directories listed in the
environment variable ``SYNTHMORPH_WEIGHTS_DIR`` (``os.pathsep``-separated; they can add models
or override packaged ones), then among the packaged models in ``synthmorph_app/data/weights``.
The packaged defaults are named after their kind: ``'affine'``, ``'rigid'``, ``'deform'``
(:data:`DEFAULT_MODELS`).
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError
from .networks import build_model, default_config, model_kind

__all__ = [
    'DEFAULT_MODELS',
    'ENV_DIR',
    'FORMAT',
    'FORMAT_VERSION',
    'KINDS',
    'init_untrained',
    'list_models',
    'load_model',
    'save_model',
    'sha256sum',
]

FORMAT = 'synthmorph-app-weights'
FORMAT_VERSION = 1
KINDS = ('affine', 'rigid', 'deform')
ENV_DIR = 'SYNTHMORPH_WEIGHTS_DIR'
#: Name of the packaged default model of each kind.
DEFAULT_MODELS = {'affine': 'affine', 'rigid': 'rigid', 'deform': 'deform'}
_KERAS_SUFFIXES = ('.h5', '.hdf5')


def sha256sum(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, 'rb') as fobj:
        for block in iter(lambda: fobj.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _packaged_dir() -> Path:
    return Path(str(resources.files('synthmorph_app') / 'data' / 'weights'))


def _search_dirs() -> list[tuple[str, Path]]:
    dirs = [('env', Path(p)) for p in os.environ.get(ENV_DIR, '').split(os.pathsep) if p]
    return dirs + [('package', _packaged_dir())]


def list_models() -> list[dict]:
    """The named models available: one dict per name with ``name``, ``kind``, ``trained``,
    ``path`` (of the card) and ``source`` ('env' or 'package'). A name found in several places
    is listed once, where :func:`load_model` would take it from."""
    seen = {}
    for source, folder in _search_dirs():
        if not folder.is_dir():
            continue
        for card_path in sorted(folder.glob('*.json')):
            name = card_path.stem
            if name in seen or not card_path.with_suffix('.pt').exists():
                continue
            try:
                card = json.loads(card_path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(card, dict) or card.get('format') != FORMAT:
                continue
            seen[name] = {
                'name': name,
                'kind': card.get('kind'),
                'trained': card.get('trained'),
                'path': str(card_path),
                'source': source,
            }
    return list(seen.values())


def _resolve(spec: str | Path | None, kind: str) -> Path:
    """The card or Keras file that ``spec`` names (see module docstring)."""
    if spec is None or spec == 'default':
        spec = DEFAULT_MODELS[kind]
    path = Path(spec)
    text = str(spec)
    is_path = isinstance(spec, Path) or os.sep in text or path.suffix != '' or path.exists()
    if (os.altsep and os.altsep in text) or text.startswith('.'):
        is_path = True
    if not is_path:
        for _, folder in _search_dirs():
            card = folder / f'{text}.json'
            if card.is_file():
                return card
        names = ', '.join(m['name'] for m in list_models()) or 'none'
        raise WeightsError(
            f'No model named {text!r} (looked in ${ENV_DIR} and the packaged models: {names}). '
            'Pass a path to a .pt/.json or an official .h5 file, or one of those names.'
        )
    suffix = path.suffix.lower()
    if suffix in _KERAS_SUFFIXES or suffix == '.json':
        candidate = path
    elif suffix == '.pt':
        candidate = path.with_suffix('.json')
    else:
        candidate = path.with_name(path.name + '.json')
    if not candidate.is_file():
        raise WeightsError(
            f'Model file <{candidate}> does not exist. Give the .pt file with its .json model card '
            'beside it, or an official SynthMorph .h5 file.'
        )
    return candidate


def _read_card(card_path: Path) -> dict:
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(
            f'Cannot read the model card <{card_path}> ({err}); restore it from the model release.'
        ) from err
    if not isinstance(card, dict) or card.get('format') != FORMAT:
        raise WeightsError(
            f'<{card_path}> is not a synthmorph-app model card (format {FORMAT!r} expected).'
        )
    version = card.get('format_version')
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise WeightsError(
            f'The model card <{card_path}> has format version {version!r}; this synthmorph-app '
            f'reads up to {FORMAT_VERSION}: upgrade synthmorph-app.'
        )
    for key in ('config', 'sha256'):
        if key not in card:
            raise WeightsError(f'The model card <{card_path}> lacks {key!r}; re-export the model.')
    return card


def load_model(
    spec: str | Path, kind: str, device: str | torch.device = 'cpu'
) -> tuple[nn.Module, dict]:
    """Load a network and its model card.

    Parameters
    ----------
    spec : str, Path or None
        A model name, a path to our ``.pt``/``.json`` (or their stem), or an official Keras
        ``.h5`` file (see the module docstring). None or ``'default'``: the default model of
        ``kind`` (:data:`DEFAULT_MODELS`).
    kind : {'affine', 'rigid', 'deform'}
        What the model must do; a model of another kind raises :class:`WeightsError`.
    device : str or torch.device
        Where to put the model.

    Returns
    -------
    model : nn.Module
        In eval mode on ``device``.
    card : dict
        The model card (for Keras files, one made up from the file: see :mod:`.keras`), plus
        ``path`` (the weights file loaded) and ``arch``.

    Raises
    ------
    WeightsError
        Missing or unreadable files, a checksum mismatch, a config that builds no network,
        weights that do not fit it (missing, unexpected or misshapen tensors), or another kind.
    """
    if kind not in KINDS:
        raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
    target = _resolve(spec, kind)
    if target.suffix.lower() in _KERAS_SUFFIXES:
        from .keras import load_keras_model

        model, card = load_keras_model(target, kind)
        return model.to(device).eval(), card

    card = _read_card(target)
    pt_path = target.with_suffix('.pt')
    if not pt_path.is_file():
        raise WeightsError(f'The weights <{pt_path}> of the model card <{target}> are missing.')
    digest = sha256sum(pt_path)
    if digest != card['sha256']:
        raise WeightsError(
            f'The weights <{pt_path}> do not match their model card (sha256 {digest}, card says '
            f'{card["sha256"]}): the file is corrupt or was replaced; download it again.'
        )
    try:
        got = model_kind(card['config'])
    except ValueError as err:
        raise WeightsError(f'The model card <{target}> has an unusable config: {err}') from err
    if got != kind:
        raise WeightsError(
            f'<{pt_path}> holds a {got!r} model, but a {kind!r} model is needed; pass a {kind} '
            'model.'
        )
    try:
        model = build_model(card['config'])
    except (TypeError, ValueError) as err:
        raise WeightsError(f'The model card <{target}> has an unusable config: {err}') from err
    try:
        state = torch.load(pt_path, map_location='cpu', weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise WeightsError(f'Cannot read the weights <{pt_path}>: {err}') from err
    if not isinstance(state, dict):
        raise WeightsError(f'<{pt_path}> does not hold a state_dict; re-export the model.')
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(
            f'The weights <{pt_path}> do not fit the network of their model card: {err}'
        ) from err
    card = {**card, 'arch': card['config']['arch'], 'path': str(pt_path)}
    return model.to(device).eval(), card


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_model(
    model: nn.Module, path_stem: str | Path, card_extra: dict | None = None
) -> tuple[Path, Path]:
    """Write ``<path_stem>.pt`` (state_dict) and ``<path_stem>.json`` (model card).

    ``card_extra`` is merged into the card (e.g. ``trained``, ``training`` provenance,
    ``validation``, ``space``); ``trained`` defaults to False, and ``space`` (the network grid
    the model works on) to ``{'voxel_size': 2.0, 'shape': [128, 128, 128], 'divisor':
    model.multiple}``: 2 mm isotropic, 128^3, with the size divisor the network needs. Both
    files are written atomically (a temporary name, then renamed). Returns the two paths.
    """
    if not hasattr(model, 'config'):
        raise ValueError('model has no config; only synthmorph-app networks can be saved')
    stem = Path(path_stem)
    if stem.suffix in ('.pt', '.json'):
        stem = stem.with_suffix('')
    stem.parent.mkdir(parents=True, exist_ok=True)
    pt_path = stem.with_name(stem.name + '.pt')
    card_path = stem.with_name(stem.name + '.json')
    state = {k: v.detach().to('cpu').contiguous() for k, v in model.state_dict().items()}
    _atomic_write(pt_path, lambda p: torch.save(state, p))
    card = {
        'format': FORMAT,
        'format_version': FORMAT_VERSION,
        'name': stem.name,
        'kind': model_kind(model.config),
        'arch': model.config['arch'],
        'config': model.config,
        'space': {'voxel_size': 2.0, 'shape': [128, 128, 128], 'divisor': model.multiple},
        'trained': False,
        'training': None,
        'parameters': int(sum(v.numel() for v in model.parameters())),
        'torch_version': torch.__version__.split('+')[0],
    }
    card.update(card_extra or {})
    card['sha256'] = sha256sum(pt_path)
    text = json.dumps(card, indent=2, sort_keys=True) + '\n'
    _atomic_write(card_path, lambda p: p.write_text(text))
    return pt_path, card_path


def init_untrained(kind: str, seed: int = 0, config: dict | None = None) -> nn.Module:
    """A randomly initialised network of ``kind`` (our default config unless ``config``).

    The initialisation is reproducible from ``seed`` and leaves the global RNG untouched.
    """
    cfg = default_config(kind) if config is None else config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg)


def _write_packaged_defaults(folder: str | Path | None = None, seed: int = 0) -> list[Path]:
    """(Re)write the untrained default models into ``folder`` (the package's by default)."""
    folder = _packaged_dir() if folder is None else Path(folder)
    out = []
    for kind, name in DEFAULT_MODELS.items():
        model = init_untrained(kind, seed)
        extra = {
            'trained': False,
            'description': (
                f'Untrained placeholder {kind} network (random initialisation, seed {seed}); '
                'it does not register images. To be replaced by a trained model.'
            ),
            'training': {'steps': 0, 'seed': seed, 'data': None},
        }
        out.extend(save_model(model, folder / name, extra))
    return out
