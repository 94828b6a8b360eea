"""Imported once by the fork server that starts Nipype's workers in a ``--device cuda`` run.

Workers forked from the main process cannot use CUDA once torch has touched it there
(:data:`synthmorph_app.cli.bids.CUDA_MP_CONTEXT`), so a GPU run's MultiProc workers come from a
fork server. They do not inherit the Nipype logging levels the command set, which this module
applies again from ``$SYNTHMORPH_NIPYPE_LEVEL``, and importing our interfaces here (torch with
them) lets every worker start without importing them again. Importing it touches no GPU.
"""

import os

from nipype import config, logging

from .. import interfaces  # noqa: F401  (torch, Nipype and our nodes, once for all workers)

LEVEL = os.environ.get('SYNTHMORPH_NIPYPE_LEVEL')
if LEVEL:
    config.update_config({'logging': {'workflow_level': LEVEL, 'interface_level': LEVEL,
                                      'utils_level': 'WARNING'}})
    logging.update_logging(config)
