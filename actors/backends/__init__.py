"""The runtimes a worker process runs a model with, behind one small interface.

Used only inside the worker child (actors/worker_main.py): the standard library and the
runtime itself, no trio. A backend is made by `open_backend`; its calls block. `parallel` says
how many `generate` calls it serves at once (the worker runs each in its own thread);
ctransformers serves one, llama.cpp as many as it has slots.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

Emit = Callable[[str], None]


class RequestRefused(Exception):
    """A request this model cannot serve; the worker stays up."""


@dataclass(frozen=True)
class GenerateRequest:
    """One generation. With `messages`, the model's own chat template makes the prompt (in
    the backends that render templates); `json_schema` constrains the output."""

    prompt: str
    max_new_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    seed: int = -1
    stop: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] | None = None
    json_schema: dict[str, Any] | None = None

    @classmethod
    def from_frame(cls, frame: dict[str, Any]) -> GenerateRequest:
        messages = frame.get("messages")
        schema = frame.get("json_schema")
        return cls(
            prompt=str(frame["prompt"]),
            max_new_tokens=int(frame["max_new_tokens"]),
            temperature=float(frame["temperature"]),
            top_p=float(frame["top_p"]),
            top_k=int(frame["top_k"]),
            seed=int(frame["seed"]),
            stop=[str(s) for s in frame.get("stop", [])],
            messages=[{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
            if isinstance(messages, list)
            else None,
            json_schema=schema if isinstance(schema, dict) else None,
        )


class Backend(Protocol):
    context_length: int
    vocab_size: int
    load_seconds: float
    parallel: int

    def generate(
        self, request: GenerateRequest, *, cancelled: threading.Event, emit: Emit
    ) -> tuple[int, int, str]:
        """Generate, calling emit with each text piece. Returns (prompt_tokens,
        completion_tokens, finish_reason), finish_reason "stop", "length" or "cancelled".
        Raises RequestRefused for a request the model cannot serve."""
        ...

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """One vector per text and the number of tokens read. Raises RequestRefused."""
        ...


def open_backend(
    runtime: str,
    path: Path,
    *,
    model_type: str,
    context_length: int,
    threads: int,
    parallel: int,
    lib: str | None = None,
) -> Backend:
    """Load the model at path with `runtime` ("llama.cpp" or "ctransformers").

    Raises what the runtime raises when the file cannot be loaded (with the runtime's reason).
    """
    if runtime == "llama.cpp":
        from actors.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(
            path, context_length=context_length, threads=threads, parallel=parallel
        )
    if runtime == "ctransformers":
        from actors.backends.ctransformers import CTransformersBackend, pick_lib

        return CTransformersBackend(
            path,
            model_type=model_type,
            context_length=context_length,
            threads=threads,
            lib=lib or pick_lib(),
        )
    raise ValueError(f"unknown runtime {runtime!r}")
