"""The llama.cpp backend (xllamacpp): llama.cpp's own server engine, in the worker process.

One `xllamacpp.Server` serves `parallel` requests at once (its slots share one KV cache of the
model's context length), renders the file's own chat template and constrains output to a JSON
schema. Its calls block until the request ends; streaming goes through a callback per piece
(and one after each prompt batch), and returning True from that callback stops the generation
(a cancel). llama.cpp cannot stop inside a batch, so prompts are evaluated in small batches: a
client that leaves mid-prompt frees its slot within one of them. Embeddings need the whole
input in one batch, so they come from a second instance of the same mapped file (its weights
are the same pages), made on the first embeddings request.

llama.cpp writes its reasons to file descriptor 2 only (the exception says "please check the
input params"). While loading, fd 2 is read back so a refused file's error names the reason;
after loading only errors are logged (verbosity 1), never a line per request.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from actors.backends import Emit, GenerateRequest, RequestRefused

# llama.cpp pads the context to a multiple of this.
CONTEXT_PADDING = 256
# Prompt tokens per thread evaluated between two chances to cancel (llama.cpp reports its
# progress after each batch, and cannot stop inside one). Measured on Gemma 3 270M, 1 thread:
# a client leaving mid-prompt freed its slot within 84 ms (max of 12) with 16, 158 ms with
# 32, 325 ms with 64 and seconds with 512; prompt evaluation ran at 153 tokens/s with 16
# against 183 with 512. More threads evaluate a batch proportionally faster, hence per thread.
PROMPT_BATCH_PER_THREAD = 16
MAX_PROMPT_BATCH = 512
# The longest input an embedding may have (the embedding instance's batch and context).
EMBED_BATCH = 512
LOG_ERRORS_ONLY = 1
# Lines that only say that loading failed, not why.
_GENERIC = re.compile(
    r"failed to load model|exiting due to|encountered an error while trying to fit|"
    r"failed to init server"
)
_TOO_LONG = re.compile(r"input \((\d+) tokens\) is too large")
_LOG_LINE = re.compile(r"^\s*[\d.]+\s+E\s+(?:\w+\s+)?(?P<message>.*)$")


def padded_context(context_length: int) -> int:
    return -(-context_length // CONTEXT_PADDING) * CONTEXT_PADDING


def load_reason(log_text: str) -> str:
    """The reasons llama.cpp logged for a failed load, most specific first, without repeats."""
    reasons: list[str] = []
    for line in log_text.splitlines():
        match = _LOG_LINE.match(line)
        if match is None:
            continue
        message = match.group("message").strip()
        if not message or _GENERIC.search(message) or message in reasons:
            continue
        reasons.append(message)
    return "; ".join(reasons[:4])


@contextmanager
def _fd2_captured() -> Iterator[Callable[[], str]]:
    """While the block runs, what is written to fd 2 can be read back (the function yielded).

    When fd 2 is a regular file (the worker's stderr file) it is read from where it ended;
    otherwise fd 2 is pointed at a temporary file and its text copied to the old fd 2 after.
    """
    try:
        is_file = stat.S_ISREG(os.fstat(2).st_mode)
    except OSError:
        is_file = False
    if is_file:
        start = os.fstat(2).st_size

        def read_file() -> str:
            size = os.fstat(2).st_size
            return os.pread(2, max(0, size - start), start).decode(errors="replace")

        yield read_file
        return
    with tempfile.TemporaryFile(prefix="modeld-llama-") as temp:
        saved = os.dup(2)
        os.dup2(temp.fileno(), 2)

        def read_temp() -> str:
            size = os.fstat(temp.fileno()).st_size
            return os.pread(temp.fileno(), size, 0).decode(errors="replace")

        try:
            yield read_temp
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            text = read_temp()
            if text:
                os.write(2, text.encode())


def import_runtime() -> Any:
    import xllamacpp

    return xllamacpp


class LlamaCppBackend:
    """One model in llama.cpp's server engine; thread-safe, `parallel` requests at once."""

    vocab_size = 0  # llama.cpp's server does not say; the daemon has it from the header

    def __init__(self, path: Path, *, context_length: int, threads: int, parallel: int) -> None:
        started = time.perf_counter()
        self._path = path
        self._threads = threads
        batch = prompt_batch(threads)
        params = self._params(padded_context(max(context_length, 1)), batch)
        params.n_parallel = parallel
        # One KV cache for all slots: each request may use the whole context.
        params.kv_unified = True
        self._server = _start(params)
        self._embedder: Any = None
        self._embedder_lock = threading.Lock()
        self.context_length = int(params.n_ctx)
        self.parallel = parallel
        self.load_seconds = time.perf_counter() - started

    def _params(self, context: int, batch: int) -> Any:
        params = import_runtime().CommonParams()
        params.model.path = str(self._path)
        params.n_ctx = context
        params.cpuparams.n_threads = self._threads
        params.cpuparams_batch.n_threads = self._threads
        params.n_batch = batch
        params.n_ubatch = batch
        params.verbosity = LOG_ERRORS_ONLY
        return params

    def _embedding_server(self) -> Any:
        """The instance that gives embeddings, made on first use: the whole input in one
        batch, mean pooling so that every model, generative ones included, gives one vector
        per input."""
        with self._embedder_lock:
            if self._embedder is None:
                params = self._params(EMBED_BATCH, EMBED_BATCH)
                params.n_parallel = 1
                params.embedding = True
                xllamacpp = import_runtime()
                params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
                self._embedder = _start(params)
            return self._embedder

    def generate(
        self, request: GenerateRequest, *, cancelled: threading.Event, emit: Emit
    ) -> tuple[int, int, str]:
        """Generate with llama.cpp, streaming pieces to emit (see actors.backends.Backend).

        With request.messages, llama.cpp renders the file's own chat template (with its BOS,
        EOS and end-of-turn tokens); otherwise request.prompt is completed as is.
        """
        chat = request.messages is not None
        body: dict[str, Any] = {
            "max_tokens": request.max_new_tokens if request.max_new_tokens > 0 else -1,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k,
            "stream": True,
            "stream_options": {"include_usage": True},
            "cache_prompt": True,
            # A chunk after each prompt batch: a cancel is seen mid-prompt, not at the first
            # token.
            "return_progress": True,
        }
        if request.seed >= 0:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        if chat:
            body["messages"] = request.messages
        else:
            body["prompt"] = request.prompt
        if request.json_schema is not None:
            if chat:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"schema": request.json_schema},
                }
            else:
                body["json_schema"] = request.json_schema

        state: dict[str, Any] = {"count": 0, "finish": None, "usage": None, "error": None}

        def on_chunk(chunk: Any) -> bool:
            if not isinstance(chunk, dict):
                return bool(cancelled.is_set())
            if "error" in chunk:
                state["error"] = chunk["error"]
                return True
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                state["usage"] = usage
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if text:
                    state["count"] += 1
                    emit(str(text))
                if choice.get("finish_reason"):
                    state["finish"] = choice["finish_reason"]
            return bool(cancelled.is_set())

        handle = self._server.handle_chat_completions if chat else self._server.handle_completions
        answer = handle(body, on_chunk)
        if isinstance(answer, dict) and "error" in answer:
            state["error"] = answer["error"]
        if state["error"] is not None:
            raise RequestRefused(_error_message(state["error"]))
        usage = state["usage"] or {}
        prompt_tokens = int(usage.get("prompt_tokens", 0))
        completion_tokens = int(usage.get("completion_tokens", state["count"]))
        if cancelled.is_set() and state["finish"] is None:
            return prompt_tokens, completion_tokens, "cancelled"
        reason = "length" if state["finish"] == "length" else "stop"
        return prompt_tokens, completion_tokens, reason

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        try:
            server = self._embedding_server()
        except RuntimeError as exc:
            raise RequestRefused(f"embeddings could not start: {exc}") from None
        answer = server.handle_embeddings({"input": texts})
        if not isinstance(answer, dict) or "error" in answer:
            message = _error_message(answer.get("error") if answer else None)
            too_long = _TOO_LONG.search(message)
            if too_long:  # llama.cpp's own advice ("increase the physical batch size") is ours
                message = (f"an input of {too_long.group(1)} tokens is longer than the "
                           f"{EMBED_BATCH} tokens an embedding input may have")
            raise RequestRefused(message)
        data = sorted(answer.get("data") or [], key=lambda item: int(item.get("index", 0)))
        vectors = [[float(v) for v in item["embedding"]] for item in data]
        usage = answer.get("usage") or {}
        return vectors, int(usage.get("prompt_tokens", 0))


def prompt_batch(threads: int) -> int:
    return min(MAX_PROMPT_BATCH, PROMPT_BATCH_PER_THREAD * max(1, threads))


def _start(params: Any) -> Any:
    """An xllamacpp.Server; a RuntimeError naming llama.cpp's reason when it refuses."""
    with _fd2_captured() as logged:
        try:
            return import_runtime().Server(params)
        except RuntimeError as exc:
            reason = load_reason(logged())
            raise RuntimeError(reason or str(exc)) from None


def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or "llama.cpp refused the request")
