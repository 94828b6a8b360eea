"""The exceptions synthmorph-app raises for problems a user can fix.

Every message names the file as ``<path>`` and says what to do about it.
"""


class SynthMorphError(Exception):
    """Base class of the errors that the CLI reports as one clear line."""


class InputImageError(SynthMorphError, ValueError):
    """An input image cannot be used (missing, corrupt, wrong dimensionality, NaN, ...)."""


class TransformFileError(SynthMorphError, ValueError):
    """A transform file cannot be read or written in the requested format."""


class WeightsError(SynthMorphError, ValueError):
    """Model weights are missing, corrupt or do not fit the architecture."""


class TemplateNotFoundError(SynthMorphError, FileNotFoundError):
    """A TemplateFlow template is not available offline."""
