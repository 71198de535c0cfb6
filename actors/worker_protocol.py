"""The parent side of the worker protocol: its errors and messages.

Frames are those of actors/frames.py (the child's side is in actors/worker_main.py).
"""

from __future__ import annotations

import signal
from typing import Any

import attrs

from actors.frames import Frame, FrameError, encode_frame


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
    """The frame's bytes. Raises WorkerRequestError for what a frame cannot carry (text UTF-8
    cannot encode: lone surrogates, which json.loads accepts from "\\ud83d" escapes), before
    anything is sent."""
    try:
        return encode_frame(message)
    except FrameError as exc:
        raise WorkerRequestError(str(exc)) from None
