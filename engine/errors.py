"""Exceptions the library raises. The CLI turns them into one line on stderr.

Every message names the file, field or value at fault and says what to do about it.
"""


class PocketInferError(Exception):
    """Base class: anything a user can fix (bad file, bad argument, missing model)."""


class ModelFormatError(PocketInferError, ValueError):
    """A model file or directory is missing, truncated, corrupt or of an unsupported kind."""


class ConfigError(PocketInferError, ValueError):
    """A model config lacks a required field or has a value pocketinfer cannot run."""


class ContextLengthError(PocketInferError, ValueError):
    """The prompt (plus requested tokens) does not fit in the context window."""


class RegistryError(PocketInferError, ValueError):
    """An unknown alias, a failed download or a hash mismatch in the model registry."""


class PlanError(PocketInferError, ValueError):
    """A plan cannot be made or used: budget below the minimum, bad device profile, bad calibration
    text, or a deploy directory that does not match its model."""


class FlashReadError(PocketInferError, OSError):
    """Reading FFN neuron bundles from flash failed (an I/O error or a short read) during a request.
    The request fails; the engine stays usable for the next one."""


class SessionError(PocketInferError, ValueError):
    """A saved conversation (engine/session_file.py) cannot be loaded: not a session file, another
    version, another model, or damaged."""
