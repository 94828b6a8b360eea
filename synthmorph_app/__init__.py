"""synthmorph-app: SynthMorph registration in PyTorch, as a library, a CLI and a BIDS-App."""

import os

# OpenMP threads that spin while they wait (libgomp's default, which torch's CPU build uses)
# collapse when a core is busy with anything else: a registration with 2 threads on a 2-core
# machine took about 240 s instead of 23 s while one core ran another job; on an idle machine
# the time was the same (benchmarks/README.md, "A busy core"). OpenMP reads this when torch is
# first imported, so it is set here, before any module of ours imports torch; a value the user
# set is kept.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

try:
    from ._version import __version__
except ImportError:  # pragma: no cover - only in a source tree that was never installed
    __version__ = '0+unknown'

__all__ = ['__version__']
