"""Nipype interfaces: thin nodes over the plain Python API.

``SynthMorphRegister`` and ``SynthMorphApply`` embed the engine in any Nipype pipeline
(``from synthmorph_app.interfaces import SynthMorphRegister``); the report and derivative
interfaces serve the BIDS-App's workflows.
"""

from .synthmorph import SynthMorphApply, SynthMorphRegister

__all__ = ['SynthMorphApply', 'SynthMorphRegister']
