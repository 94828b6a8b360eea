"""synthmorph-app: SynthMorph registration in PyTorch, as a library, a CLI and a BIDS-App."""

try:
    from ._version import __version__
except ImportError:  # pragma: no cover - only in a source tree that was never installed
    __version__ = '0+unknown'

__all__ = ['__version__']
