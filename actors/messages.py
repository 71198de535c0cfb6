"""Commands to a model actor and what it answers.

Every command carries its reply channel. The actor answers inside `async with cmd.reply:`, so
if it dies the channel closes and the caller gets `EndOfChannel` instead of waiting forever.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import attrs
import trio

from actors.embedding import EmbeddingJob
from actors.errors import ModelError
from actors.generation import GenerationStream
from actors.keepalive import DEFAULT, FOREVER, KeepAliveArg
from actors.memory import MemoryShape
from actors.spec import ModelSpec
from actors.state import State
from actors.worker import GenerateParams


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
    retrying: str | None = None  # modeld: "retrying (2/6): connection refused", while it waits
    queue_position: int | None = None  # modeld: its place while it waits ([download] max_active)
    connections: int | None = None  # modeld: connections moving its bytes now

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
    memory: MemoryShape | None = None  # what it will take in memory, from its header


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
    runtime: str | None = None  # the runtime that runs it (or would); None: none would
    slots: int = 1  # requests its loaded worker serves at once
    context_length: int | None = None  # the loaded worker's real context length
    busy: int = 0  # generations and embeddings running on its worker now
    idle_since: float | None = None  # wall-clock time (epoch s) its last request ended
    expires_at: float | None = None  # wall-clock time (epoch s) it is unloaded if still idle
    keep_alive: float | None = None  # seconds it stays loaded when idle; None: until unloaded
    memory_estimate: int | None = None  # bytes it takes (or would take) loaded; None: unknown


Reply = ModelView | ModelError


@attrs.frozen(kw_only=True)
class Command:
    operation: ClassVar[str] = "handling a command"  # what it does, for error messages
    reply: trio.MemorySendChannel[Reply]


@attrs.frozen(kw_only=True)
class GetSnapshot(Command):
    operation = "reading the model"


@attrs.frozen(kw_only=True)
class StartDownload(Command):
    operation = "starting the download"


@attrs.frozen(kw_only=True)
class CancelDownload(Command):
    operation = "cancelling the download"


@attrs.frozen(kw_only=True)
class Load(Command):
    """Load the model. An explicit load keeps it until it is unloaded (FOREVER) unless it
    gives its own keep-alive; a load on first use passes DEFAULT (or the request's)."""

    operation = "loading the model"
    keep_alive: KeepAliveArg = FOREVER


@attrs.frozen(kw_only=True)
class Unload(Command):
    """Unload the model; with `if_idle` (eviction), refuse with Conflict `busy` while a
    request uses it."""

    operation = "unloading the model"
    if_idle: bool = False


@attrs.frozen(kw_only=True)
class UpdateSpec(Command):
    """Change the model's record: `change` maps the spec as it is now to the new one (it may
    raise a ModelError to refuse), so that concurrent updates each see the other's result."""

    operation = "updating the model's record"
    change: Callable[[ModelSpec], ModelSpec]


@attrs.frozen(kw_only=True)
class ImportFile(Command):
    """Publish an already-written temp file (in the storage dir) as this model's file. With
    `spec` (an update from the model's Hub source): `temp` is the update's first file in
    `updates/` (actors/file_update.py staged_paths: a split set's other parts beside it), each
    verified against its sha256; the model takes that spec with the files, in one step, and
    stays in its state: a loaded model goes on with the old files, and loads the new ones next
    time."""

    operation = "publishing the uploaded file"
    temp: Path
    sha256: str  # of the file's bytes, taken as they arrived
    spec: ModelSpec | None = None


@attrs.frozen(kw_only=True)
class Delete(Command):
    operation = "deleting the model's files"


@attrs.frozen(kw_only=True)
class Generate:
    """Borrow a loaded model for one prompt; the reply is a `GenerationStream` or the refusal
    (Conflict when the model is not loaded). Touches the model in the LRU."""

    prompt: str
    params: GenerateParams
    reply: trio.MemorySendChannel[GenerationStream | ModelError]
    keep_alive: KeepAliveArg = DEFAULT  # the request's own keep_alive, if it gave one


@attrs.frozen(kw_only=True)
class Embed:
    """Borrow a loaded model for the embeddings of some texts; the reply is an `EmbeddingJob`
    or the refusal (Conflict when the model is not loaded). Touches the model in the LRU."""

    texts: list[str]
    reply: trio.MemorySendChannel[EmbeddingJob | ModelError]
    keep_alive: KeepAliveArg = DEFAULT
