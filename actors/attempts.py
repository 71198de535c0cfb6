"""The long jobs a model actor runs as tasks (a download, a load) and the messages it sends
itself when they end, so that the actor loop alone moves the state."""

from __future__ import annotations

import attrs
import trio

from actors import messages as m
from actors.errors import ModelError
from actors.ports import WorkerHandle


@attrs.define(eq=False)
class DownloadAttempt:
    scope: trio.CancelScope
    ended: trio.Event
    previous: trio.Event | None  # the end of the attempt before, which must end first
    error: Exception | None = None


@attrs.frozen
class DownloadEnded:
    attempt: DownloadAttempt


@attrs.define(eq=False)
class LoadAttempt:
    scope: trio.CancelScope
    ended: trio.Event
    waiters: list[trio.MemorySendChannel[m.Reply]]
    worker: WorkerHandle | None = None
    error: ModelError | None = None
    facts: m.FileFacts | None = None
    seconds: float = 0.0  # from spawning the worker to its ready message


@attrs.frozen
class LoadEnded:
    attempt: LoadAttempt


@attrs.frozen
class WorkerExited:
    worker: WorkerHandle
    returncode: int


@attrs.frozen
class FactsRead:
    """The header facts of a file found on disk at start, read after the actor serves."""

    facts: m.FileFacts | None
