"""What a model actor needs from the world, as Protocols: a fetcher, a worker spawner, a gate.

The registry plugs in the real ones (actors.download, actors.worker, its LRU gate); tests plug
in fakes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from actors.download import DownloadRequest, ProgressSink
from actors.spec import ModelSpec
from actors.worker import Embeddings, GenerateParams, GenerationResult, WorkerInfo

Fetcher = Callable[[DownloadRequest, ProgressSink], Awaitable[None]]


class TextStream(Protocol):
    """One generation's text pieces, as a worker streams them (actors.worker.Generation)."""

    @property
    def result(self) -> GenerationResult | None: ...
    async def __anext__(self) -> str: ...
    async def aclose(self) -> None: ...


class WorkerHandle(Protocol):
    @property
    def pid(self) -> int: ...
    @property
    def info(self) -> WorkerInfo: ...
    async def wait_exited(self) -> int: ...
    async def aclose(self, grace: float = ...) -> None: ...
    def generate(self, prompt: str, params: GenerateParams) -> TextStream: ...
    async def embed(self, texts: list[str]) -> Embeddings: ...


# Starts a worker for the file at a path with a spec's settings; also given the file's chat
# template (None: it has none), read from its header already.
Spawner = Callable[[Path, ModelSpec, str | None], Awaitable[WorkerHandle]]


class LoadGate(Protocol):
    """The registry's load policy (max_loaded, least recently used first out)."""

    async def admit(self, model_id: str, need: int) -> None: ...
    def release(self, model_id: str) -> None: ...
    def touch(self, model_id: str) -> None: ...
    def idle(self, model_id: str) -> None:
        """The model's last request ended: a load waiting for room looks again."""
