"""What can go wrong with a model, as seen by whoever sent the command.

The HTTP status of each kind is chosen in exactly one place, supervisor/api/app.py.
"""

from __future__ import annotations


class ModelError(Exception):
    """Base class: `code` is machine-readable, the message is a sentence a person can act on."""

    code = "model_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class InvalidInput(ModelError):
    code = "invalid_request"


class ModelNotFound(ModelError):
    code = "model_not_found"


class Conflict(ModelError):
    code = "conflict"


class OperationFailed(ModelError):
    code = "operation_failed"


class InsufficientMemory(ModelError):
    code = "insufficient_memory"


class InsufficientStorage(ModelError):
    """A file that does not fit on the storage filesystem (refused before any byte)."""

    code = "insufficient_storage"


class Unavailable(ModelError):
    """The actor did not answer (it stopped or restarted while the command waited)."""

    code = "unavailable"


def crash_error(operation: str, exc: BaseException) -> OperationFailed:
    """What the caller of a command hears when the actor crashed handling it (`operation`, e.g.
    "deleting the model's files"): the exception as one sentence (an OSError by its strerror
    and file)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        reason = f"{exc.strerror}{where}"
    else:
        reason = str(exc) or type(exc).__name__
    return OperationFailed(f"{operation} failed: {reason}", code="actor_crashed")
