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


class Unavailable(ModelError):
    """The actor did not answer (it stopped or restarted while the command waited)."""

    code = "unavailable"
