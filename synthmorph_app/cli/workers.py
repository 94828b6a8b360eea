"""Imported once by the fork server that starts Nipype's MultiProc workers.

Workers from a fork server (those of a ``--device cuda`` run, :data:`synthmorph_app.cli.bids.
CUDA_MP_CONTEXT`, and those of every run on Python 3.14 and later, where it is the default)
do not inherit the Nipype logging levels the command set: this module applies them again from
``$SYNTHMORPH_NIPYPE_LEVEL``. Importing our interfaces here (torch with them) lets every worker
start without importing them again. Importing it touches no GPU.
"""

import os

from .. import interfaces  # noqa: F401  (torch, Nipype and our nodes, once for all workers)
from ..utils.logs import set_nipype_level

LEVEL = os.environ.get('SYNTHMORPH_NIPYPE_LEVEL')
if LEVEL:
    set_nipype_level(LEVEL)
