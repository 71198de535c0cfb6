"""Commands to a model actor and what it answers.

Every command carries its reply channel. The actor answers inside `async with cmd.reply:`, so
if it dies the channel closes and the caller gets `EndOfChannel` instead of waiting forever.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import trio

from actors.errors import ModelError
from actors.spec import ModelSpec
from actors.state import State


@attrs.frozen
class Progress:
    """A download progress snapshot (the ModelDownloadProgress of the API)."""

    model: str
    status: str = "UNKNOWN"
    percentage: float = 0.0
    bytes: int = 0
    total: int | None = None
    bytes_per_second: float | None = None
    eta_seconds: float | None = None
    error: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in ("COMPLETED", "FAILED", "CANCELED", "UNKNOWN")


@attrs.frozen
class FileFacts:
    """What the published file's GGUF header says."""

    size: int
    context_length: int | None = None
    quantization: str | None = None
    parameter_count: int | None = None
    architecture: str | None = None
    chat_template: str | None = None


@attrs.frozen
class ModelView:
    """Everything the outside may know about a model at one moment."""

    spec: ModelSpec
    state: State
    error: str | None = None
    partial_bytes: int = 0
    load_seconds: float | None = None
    facts: FileFacts | None = None
    worker_pid: int | None = None


Reply = ModelView | ModelError


@attrs.frozen(kw_only=True)
class Command:
    reply: trio.MemorySendChannel[Reply]


@attrs.frozen(kw_only=True)
class GetSnapshot(Command):
    pass


@attrs.frozen(kw_only=True)
class StartDownload(Command):
    pass


@attrs.frozen(kw_only=True)
class CancelDownload(Command):
    pass


@attrs.frozen(kw_only=True)
class Load(Command):
    pass


@attrs.frozen(kw_only=True)
class Unload(Command):
    pass


@attrs.frozen(kw_only=True)
class UpdateSpec(Command):
    spec: ModelSpec


@attrs.frozen(kw_only=True)
class ImportFile(Command):
    """Publish an already-written temp file (in the storage dir) as this model's file."""

    temp: Path


@attrs.frozen(kw_only=True)
class Delete(Command):
    pass
