"""The exceptions of uaa: one class per ``uaa::ErrorCode`` of the C++ library.

Every failure of a uaa call is a :class:`Error` carrying the C++ message ("uaa::forward: rank 2:
q.tokens 17 but the plan gives this rank 16") and its code (``err.code``, the C++ name:
``"invalid_argument"``, ...). A collective call (``Communicator``, ``Plan``, ``attention``,
``forward``, ``backward``) raises the *same* error on every rank of the communicator: a bad
argument on one rank stops every rank with that rank's message, and nothing is written to the
outputs. See docs/FAILURE_MODEL.md for when each one fires and what to do next.

Where it fits, a class also derives from the Python built-in of the same meaning, so that generic
handlers keep working: ``InvalidArgumentError`` is a ``ValueError``, ``UnsupportedError`` a
``NotImplementedError``, ``OutOfMemoryError`` a ``MemoryError`` and ``TimeoutError`` the built-in
``TimeoutError``.
"""

import builtins

__all__ = [
    "Error",
    "InvalidArgumentError",
    "MismatchError",
    "UnsupportedError",
    "CommFailureError",
    "TimeoutError",
    "InternalError",
    "OutOfMemoryError",
    "ERROR_CLASSES",
]


class Error(RuntimeError):
    """A uaa failure; ``code`` is the C++ ``uaa::ErrorCode`` name, ``message`` the C++ text."""

    code = "unknown"

    @property
    def message(self):
        return str(self.args[0]) if self.args else ""


class InvalidArgumentError(Error, ValueError):
    """A value the caller passed is out of range or inconsistent with the plan (any rank's)."""

    code = "invalid_argument"


class MismatchError(Error):
    """Ranks disagree: different plans or shapes, calls out of step, different kernel variants."""

    code = "mismatch"


class UnsupportedError(Error, NotImplementedError):
    """A valid request this build or kernel cannot serve (e.g. a dtype the kernel lacks)."""

    code = "unsupported"


class CommFailureError(Error):
    """The transport reported an error, or the communicator is poisoned by an earlier failure."""

    code = "comm_failure"


class TimeoutError(Error, builtins.TimeoutError):  # noqa: A001 (uaa.TimeoutError on purpose)
    """A peer did not arrive before the deadline; the message names the missing ranks."""

    code = "timeout"


class InternalError(Error):
    """A bug in uaa: please report it with the message."""

    code = "internal"


class OutOfMemoryError(Error, MemoryError):
    """A rank could not allocate what the call needs (its workspace)."""

    code = "out_of_memory"


#: code name -> class
ERROR_CLASSES = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        MismatchError,
        UnsupportedError,
        CommFailureError,
        TimeoutError,
        InternalError,
        OutOfMemoryError,
    )
}
