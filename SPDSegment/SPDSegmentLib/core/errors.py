"""Errors the user can act on. Every message says what is wrong and what to do.

Messages speak of settings by name ("the torch runtime", "the model"), not of one front end's
spelling of them: ``setting`` names the setting to change, and each front end adds how (the command
line appends its option, e.g. ``--runtime``).
"""
from __future__ import annotations

from typing import Optional


class SPDError(Exception):
    """Base class: a problem the user can fix (bad input, missing model, ...)."""

    def __init__(self, message: str = "", setting: Optional[str] = None):
        super().__init__(message)
        self.setting = setting  # "runtime", "precision", "device", "model", ... or None


class InputError(SPDError, ValueError):
    """The image, prompts or labels cannot be used as given."""


class CheckpointError(SPDError):
    """A model file is missing, corrupt, of the wrong kind or incompatible."""


class RuntimeChoiceError(SPDError, ValueError):
    """The chosen inference runtime or precision cannot run on this machine or device."""


class DeviceError(SPDError, ValueError):
    """The chosen device (e.g. a CUDA GPU) is not available to PyTorch."""


class DownloadError(SPDError):
    """A checkpoint could not be downloaded (no network, bad checksum)."""


class Cancelled(SPDError):
    """The user cancelled the run; nothing was written."""


class SPDWarning(UserWarning):
    """Something the user should know that did not stop the run (e.g. an unusable cache folder was replaced by a
    temporary one). Issued with ``warnings.warn``; the command line prints it as ``warning: ...``."""
