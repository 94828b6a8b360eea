"""Registrations kept on disk, so that one registration serves several jobs.

The BIDS-App registers an image of another contrast through the T1w of its session
(:func:`.register.register_via`), and the T1w's own job registers that same T1w to the same
template with the same settings. With a cache folder (the BIDS-App uses one in its work
directory), whichever job comes first stores the result, and the other reads it instead of
computing it again. A result is stored under a key made of all that decides it: the bytes of
both images and of the masks, the registration options, the bytes of the model files used and
the package version. Each entry (``forward.h5``, ``inverse.h5``, ``info.json``) is written into a
temporary folder and renamed into place, so jobs running side by side at worst compute the same
result twice, and a job stopped half-way leaves no entry.

>>> from synthmorph_app.engine.cache import MODEL_KINDS
>>> MODEL_KINDS['joint']
('affine', 'deform')
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .. import __version__
from ..io.images import Geometry
from ..io.transforms import load_transform, save_transform

LOGGER = logging.getLogger('synthmorph_app.engine.cache')

#: The models each mode runs.
MODEL_KINDS = {'joint': ('affine', 'deform'), 'deform': ('deform',), 'affine': ('affine',),
               'rigid': ('rigid',)}


def _file_digest(path, digest) -> None:
    with open(path, 'rb') as fobj:
        for block in iter(lambda: fobj.read(1 << 20), b''):
            digest.update(block)


def _model_files(options: dict) -> list[Path]:
    """The files of the models ``options`` make :func:`.register.register` load."""
    from .weights import _resolve

    files = []
    weights = options.get('weights') or {}
    for kind in MODEL_KINDS[options.get('mode', 'joint')]:
        spec = weights.get(kind)
        if isinstance(spec, tuple):  # a ready (model, card) pair: nothing on disk to key
            raise TypeError('a registration with in-memory models cannot be cached')
        card = _resolve(spec, kind)
        files.append(card)
        if card.suffix == '.json':
            files.append(card.with_suffix('.pt'))
    return files


def registration_key(moving_file, fixed_file, options: dict, masks: dict | None = None) -> str:
    """Hex SHA-256 of what decides a registration: the image and mask files' bytes, the
    options (keywords of :func:`.register.register` other than images and masks), the model
    files' bytes and the package version."""
    digest = hashlib.sha256(f'synthmorph-app {__version__}\n'.encode())
    for name, path in (('moving', moving_file), ('fixed', fixed_file),
                       *sorted((masks or {}).items())):
        digest.update(f'{name}\n'.encode())
        if path:
            _file_digest(path, digest)
    for path in _model_files(options):
        digest.update(f'model {path.name}\n'.encode())
        _file_digest(path, digest)
    text = json.dumps({k: v for k, v in options.items() if k != 'weights'}, sort_keys=True,
                      default=str)
    digest.update(text.encode())
    return digest.hexdigest()


def cached_registration(cache_dir, key: str, compute: Callable, *, reference: Geometry,
                        moving: Geometry):
    """The registration stored under ``key`` in ``cache_dir``, or ``compute()``'s, stored.

    ``reference`` and ``moving`` are the fixed and moving images' grids (attached to the
    transforms read back). A result read back has ``info['cache'] = 'read'`` (and the info of
    the run that computed it); one computed and stored here ``'written'``. Storing is best
    effort: where it fails (a read-only or full disk), the result is returned all the same.
    """
    from .register import RegistrationResult

    entry = Path(cache_dir) / key
    if (entry / 'info.json').is_file():
        try:
            info = json.loads((entry / 'info.json').read_text())
            forward = load_transform(entry / 'forward.h5', reference=reference, moving=moving)
        except (OSError, ValueError) as err:  # unreadable: compute again
            LOGGER.warning('ignoring the unreadable cached registration <%s>: %s', entry, err)
        else:
            LOGGER.info('registration read from the cache <%s>', entry)
            info['cache'] = 'read'
            return RegistrationResult(
                forward,
                lambda: load_transform(entry / 'inverse.h5', reference=moving,
                                       moving=reference),
                {}, info)
    result = compute()
    scratch = None
    try:  # storing is a courtesy to later jobs: a failure here must not fail this one
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f'.{key[:12]}-', dir=cache_dir))
        save_transform(result.forward, scratch / 'forward.h5')
        save_transform(result.inverse, scratch / 'inverse.h5')
        (scratch / 'info.json').write_text(json.dumps(result.info, default=str))
        try:
            os.rename(scratch, entry)
        except OSError:  # another job stored it first: keep theirs
            pass
        else:
            result.info['cache'] = 'written'
    except (OSError, ValueError) as err:
        LOGGER.warning('could not keep the registration in <%s>: %s', cache_dir, err)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return result
