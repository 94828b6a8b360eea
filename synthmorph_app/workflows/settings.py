"""The settings every workflow factory shares, in two objects instead of a dozen keywords.

>>> from synthmorph_app.workflows.settings import OutputSettings, RegistrationSettings
>>> RegistrationSettings(mode='affine', refine=20).register_kwargs()['mode']
'affine'
>>> OutputSettings(output_lta=True).output_lta
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RegistrationSettings:
    """How each image is registered: the keywords of
    :func:`~synthmorph_app.workflows.registration.init_register_template_wf` (and of
    :class:`~synthmorph_app.interfaces.synthmorph.SynthMorphRegister`), see there."""

    mode: str = 'joint'
    lam: float = 0.5
    extent: float = 256.0
    passes: int = 1
    refine: int = 0
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


@dataclass(frozen=True)
class OutputSettings:
    """What is written besides the registrations: report figures, the command line recorded
    in the sidecars, and FreeSurfer LTA copies of the transforms."""

    figures: bool = True
    command_line: str = ''
    output_lta: bool = False
