"""Errors the user can act on. Every message says what is wrong and what to do."""


class SPDError(Exception):
    """Base class: a problem the user can fix (bad input, missing model, ...)."""


class InputError(SPDError, ValueError):
    """The image, prompts or labels cannot be used as given."""


class CheckpointError(SPDError):
    """A model file is missing, corrupt, of the wrong kind or incompatible."""


class RuntimeChoiceError(SPDError, ValueError):
    """The chosen inference runtime or precision cannot run on this machine or device."""


class DownloadError(SPDError):
    """A checkpoint could not be downloaded (no network, bad checksum)."""


class Cancelled(SPDError):
    """The user cancelled the run; nothing was written."""
