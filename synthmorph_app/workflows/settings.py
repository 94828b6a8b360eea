"""The settings every workflow factory shares, in two objects instead of a dozen keywords.

>>> from synthmorph_app.workflows.settings import OutputSettings, RegistrationSettings
>>> RegistrationSettings(mode='affine', refine=20).register_kwargs()['mode']
'affine'
>>> OutputSettings(output_lta=True).output_lta
True
>>> sorted(RegistrationSettings(device='cuda').signature())[:4]
['cross_contrast', 'extent', 'init_method', 'lambda']
>>> 'lambda' in RegistrationSettings(mode='affine').signature()
False
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ..engine import DEFAULT_REFINE, DEFAULT_REFINE_LEVELS

#: The ``refine_options`` that decide a registration (see :meth:`RegistrationSettings.signature`).
REFINE_KEYS = ('init_method', 'refine_metric', 'refine_levels', 'refine_weight', 'cross_contrast')


@dataclass(frozen=True)
class RegistrationSettings:
    """How each image is registered: the keywords of
    :func:`~synthmorph_app.workflows.registration.init_register_template_wf` (and of
    :class:`~synthmorph_app.interfaces.synthmorph.SynthMorphRegister`), see there."""

    mode: str = 'joint'
    lam: float = 0.5
    extent: float = 256.0
    passes: int = 1
    refine: int = DEFAULT_REFINE
    refine_options: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    device: str = 'cpu'
    omp_nthreads: int = 1
    #: register other contrasts through the T1w of their session where there is one
    via_t1w: bool = False
    #: where registrations are kept for reuse (engine.cache); '' for none
    cache_dir: str = ''

    def register_kwargs(self) -> dict:
        """Keywords for :func:`init_register_template_wf`."""
        out = asdict(self)
        out['refine_options'] = dict(self.refine_options) or None
        out['weights'] = dict(self.weights) or None
        out['cache_dir'] = self.cache_dir or None
        return out

    def signature(self, *, via: bool = False, inputs: dict | None = None) -> dict:
        """What decides an image's registration, as its sidecars record it
        (``RegistrationSettings``): the BIDS-App redoes an image whose derivatives were made
        with another signature. ``via``: the image goes through the T1w of its session;
        ``inputs``: the checksums of the files read
        (:func:`~synthmorph_app.utils.bids.input_checksums`), recorded as ``inputs``.

        The device, the threads and the cache folder are left out: they do not change what
        is computed; so are, in the linear modes, lambda, the passes of the deformable network
        and the deformable refinement's levels. Levels left to the engine are recorded as its
        default (:data:`~synthmorph_app.engine.DEFAULT_REFINE_LEVELS`).
        """
        from ..interfaces.derivatives import LINEAR_MODES

        options = dict(self.refine_options)
        out = {'mode': self.mode, 'lambda': self.lam, 'extent': self.extent,
               'passes': self.passes, 'refine': self.refine,
               **{key: options.get(key) for key in REFINE_KEYS},
               'weights': dict(self.weights), 'via_t1w': bool(via)}
        if self.mode in LINEAR_MODES:
            for key in ('lambda', 'passes', 'refine_levels'):
                del out[key]
        elif out['refine_levels'] is None and self.refine:
            # the engine's default as it is now: derivatives made under another default
            # (8,4,2 before session 36, recorded as null) are redone
            out['refine_levels'] = list(DEFAULT_REFINE_LEVELS)
        if inputs:
            out['inputs'] = dict(inputs)
        return json.loads(json.dumps(out))  # as read back from a sidecar (tuples as lists)


@dataclass(frozen=True)
class OutputSettings:
    """What is written besides the registrations: report figures, the command line recorded
    in the sidecars, and FreeSurfer LTA copies of the transforms."""

    figures: bool = True
    command_line: str = ''
    output_lta: bool = False
