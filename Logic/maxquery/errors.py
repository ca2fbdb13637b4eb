"""Errors a user can act on. Each message says what is wrong and what to do.

The command line maps them to its exit codes: ``MaxQueryError`` subclasses other than the two
resource errors mean bad input or usage (2), ``ResourceError`` and ``WriteFailed`` mean that
memory or disk ran short (3), ``RunCancelled`` an interruption.
"""


class MaxQueryError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class InputError(MaxQueryError, ValueError):
    """The input image cannot be processed (not 3D, not CT, NaNs, empty, bad geometry, unreadable)."""


class OutputError(MaxQueryError):
    """The outputs cannot go where they were asked to (not a folder, not writable, names clash)."""


class ResourceError(MaxQueryError, MemoryError):
    """The run would need more memory than is available; the message says how to reduce it."""


class WriteFailed(MaxQueryError, OSError):
    """Writing an output failed (disk full, device error); nothing of that case was kept."""


class RunCancelled(MaxQueryError):
    """The user cancelled the run; nothing was written."""


class UsageError(MaxQueryError):
    """Options that do not fit together or with the model (e.g. a score the model cannot give)."""
