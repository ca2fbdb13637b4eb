"""Errors a user can act on. Each message says what is wrong and what to do."""


class MaxQueryError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class InputError(MaxQueryError, ValueError):
    """The input image cannot be processed (not 3D, not CT, NaNs, empty, bad geometry, unreadable)."""


class ResourceError(MaxQueryError, MemoryError):
    """The run would need more memory than is available; the message says how to reduce it."""


class RunCancelled(MaxQueryError):
    """The user cancelled the run; nothing was written."""
