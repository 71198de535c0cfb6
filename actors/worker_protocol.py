"""The parent side of the worker protocol: its errors, messages and frame reader.

Frames are a 4-byte big-endian length and UTF-8 JSON (the child's side is in
actors/worker_main.py). Used by actors/worker.py and actors/pump.py.
"""

from __future__ import annotations

import json
import signal
import struct
from typing import Any

import attrs
import trio


class WorkerError(Exception):
    """Something went wrong with an inference worker process."""


class WorkerStartError(WorkerError):
    """The worker could not load the model; the message comes from the child or its stderr."""


class WorkerDied(WorkerError):
    """The worker process exited while a request was in flight (or before it was sent)."""

    def __init__(self, message: str, *, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.signal: signal.Signals | None = _signal_of(returncode)


class WorkerRequestError(WorkerError):
    """The worker refused one request (e.g. a prompt longer than the context); it stays up."""


class WorkerExiting(WorkerError):
    """The worker was told to exit (unload, shutdown) while this request was running."""


MAX_FRAME = 64 * 1024 * 1024

Frame = dict[str, Any]


@attrs.frozen
class WorkerInfo:
    pid: int
    context_length: int
    vocab_size: int
    load_seconds: float
    runtime: str = "ctransformers"
    parallel: int = 1  # requests the worker serves at once


@attrs.frozen
class GenerateParams:
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    seed: int = -1
    stop: tuple[str, ...] = ()
    # Chat messages: the runtime renders the model's own chat template (llama.cpp only; for
    # ctransformers the caller renders the prompt).
    messages: tuple[tuple[str, str], ...] | None = None
    json_schema: dict[str, Any] | None = attrs.field(default=None, eq=False)


@attrs.frozen
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


@attrs.frozen
class GenerationResult:
    """How a generation ended. finish_reason: "stop", "length" or "cancelled"."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def _signal_of(returncode: int | None) -> signal.Signals | None:
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode)
    except ValueError:
        return None


def describe_exit(returncode: int | None) -> str:
    """A returncode in words: "exit code 1", "killed by SIGSEGV", "still running"."""
    if returncode is None:
        return "still running"
    sig = _signal_of(returncode)
    if sig is not None:
        return f"killed by {sig.name}"
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def encode_message(message: Frame) -> bytes:
    """The frame's bytes. Raises WorkerRequestError for text that UTF-8 cannot carry (lone
    surrogates, which json.loads accepts from "\\ud83d" escapes), before anything is sent."""
    try:
        body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError as exc:
        raise WorkerRequestError(
            f"the text is not valid Unicode ({exc.reason} at position {exc.start})"
        ) from None
    return struct.pack(">I", len(body)) + body


class FrameReader:
    """Frames from the child's stdout. The buffer outlives a cancelled receive, so a frame
    interrupted by cancellation is delivered whole to the next receive."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def receive(self) -> Frame | None:
        """The next frame, or None at end of stream (the child is gone or going)."""
        while True:
            if len(self._buffer) >= 4:
                (length,) = struct.unpack(">I", self._buffer[:4])
                if length > MAX_FRAME:
                    raise WorkerError(f"worker sent a {length}-byte frame; the protocol is broken")
                if len(self._buffer) >= 4 + length:
                    body = bytes(self._buffer[4 : 4 + length])
                    del self._buffer[: 4 + length]
                    try:
                        message = json.loads(body.decode())
                    except ValueError:  # UnicodeDecodeError and JSONDecodeError included
                        raise WorkerError("worker sent a frame that is not JSON") from None
                    if not isinstance(message, dict):
                        raise WorkerError("worker sent a frame that is not a JSON object")
                    return message
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                return None
            self._buffer += chunk
