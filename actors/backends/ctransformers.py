"""The ctransformers 0.2.27 backend: llama-architecture GGUF files, one request at a time.

ctransformers crashes rather than raises on some damaged files and on concurrent use, which is
why it runs only in a worker process and behind one lock.
"""

from __future__ import annotations

import codecs
import ctypes
import importlib.util
import re
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from actors.backends import Emit, GenerateRequest, RequestRefused


def pick_lib(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The ctransformers build this CPU runs: avx2, else avx, else basic.

    Passing it avoids py-cpuinfo, which costs about a second per load.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "basic"
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    if "avx2" in flags:
        return "avx2"
    if "avx" in flags:
        return "avx"
    return "basic"


def worst_case_tokens(data: bytes) -> int:
    """Token slots enough for any llama tokenization of data.

    Each byte can become a byte-fallback token, a space becomes "▁" (3 bytes, so up to 3
    tokens), plus a leading space and the BOS token.
    """
    return 3 * (len(data) + 1) + 2


def _safe_tokenize(self: Any, text: str, add_bos_token: bool | None = None) -> list[int]:
    # Replaces ctransformers' LLM.tokenize, which allocates len(text) + 1 slots and overflows
    # the heap when a text has more tokens than characters (emoji, CJK, byte fallback).
    if add_bos_token is None:
        add_bos_token = self.model_type == "llama"
    data = text.encode()
    slots = (ctypes.c_int * worst_case_tokens(data))()
    n_tokens = int(self.ctransformers_llm_tokenize(data, add_bos_token, slots))
    return list(slots[:n_tokens])


def import_runtime() -> tuple[Any, Any]:
    """ctransformers' `LLM` and `Config` classes, without running the package's __init__.

    That __init__ imports its Hugging Face hub client (huggingface_hub and an HTTP stack): about
    0.25 s, most of a small model's load time, for nothing when the model is a local file. A bare
    package module in its place lets `ctransformers.llm` import with its own few dependencies.
    """
    if "ctransformers" not in sys.modules:
        spec = importlib.util.find_spec("ctransformers")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("the ctransformers package is not installed")
        package = types.ModuleType("ctransformers")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["ctransformers"] = package
    from ctransformers.llm import LLM, Config

    return LLM, Config


class CTransformersBackend:
    """One ctransformers model; every call into it holds one lock (it is not thread-safe),
    so it serves one request at a time."""

    parallel = 1

    def __init__(
        self, path: Path, *, model_type: str, context_length: int, threads: int, lib: str
    ) -> None:
        # Imported here so that a broken runtime install is reported as a load error.
        llm_class, config_class = import_runtime()

        self._lock = threading.Lock()
        started = time.perf_counter()
        with self._lock:
            # What AutoModelForCausalLM.from_pretrained does for a local file, minus the hub.
            # mmap=False: a truncated file then fails with an exception instead of garbage or
            # SIGSEGV, the weights are resident and show in this process's RSS (what memory
            # policy measures), and a file replaced on disk cannot SIGBUS a loaded model.
            self._llm = llm_class(
                model_path=str(path),
                model_type=model_type,
                config=config_class(
                    context_length=context_length, threads=threads, gpu_layers=0, mmap=False
                ),
                lib=lib,
            )
            self._llm.tokenize = types.MethodType(_safe_tokenize, self._llm)
            self.context_length = int(self._llm.context_length)
            self.vocab_size = int(self._llm.vocab_size)
        self.load_seconds = time.perf_counter() - started

    def generate(
        self, request: GenerateRequest, *, cancelled: threading.Event, emit: Emit
    ) -> tuple[int, int, str]:
        """Generate from request.prompt (ctransformers renders no chat template: the daemon
        sends the prompt already made), calling emit with each text piece.

        Returns (prompt_tokens, completion_tokens, finish_reason) where finish_reason is "stop"
        (end of text or a stop string), "length" (max_new_tokens or the context is full) or
        "cancelled". Raises RequestRefused when the prompt does not fit the context or the
        output is to be constrained (ctransformers cannot).
        """
        if request.json_schema is not None:
            raise RequestRefused(
                "ctransformers cannot constrain the output to JSON; run the model with the "
                "llama.cpp runtime"
            )
        with self._lock:
            tokens = self._llm.tokenize(request.prompt)
            n_prompt = len(tokens)
            if n_prompt >= self.context_length:
                raise RequestRefused(
                    f"the prompt is {n_prompt} tokens but the context holds "
                    f"{self.context_length}; shorten the prompt or load the model with a "
                    "longer context"
                )
            budget = min(request.max_new_tokens, self.context_length - n_prompt)
            if budget <= 0:
                return n_prompt, 0, "length"
            stream: Iterator[int] = self._llm.generate(
                tokens,
                top_k=request.top_k,
                top_p=request.top_p,
                temperature=request.temperature,
                seed=request.seed,
                reset=True,
            )
            count, reason = _stream_text(
                self._llm,
                stream,
                budget=budget,
                stop=request.stop,
                cancelled=cancelled,
                emit=emit,
            )
            return n_prompt, count, reason

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        raise RequestRefused(
            "ctransformers models give no embeddings; run the model with the llama.cpp runtime"
        )


def _stream_text(
    llm: Any,
    stream: Iterator[int],
    *,
    budget: int,
    stop: list[str],
    cancelled: threading.Event,
    emit: Callable[[str], None],
) -> tuple[int, str]:
    # An incremental decoder holds back partial UTF-8 sequences correctly; ctransformers'
    # own splitter holds back every non-ASCII byte and drops the tail at the end.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stop_regex = re.compile("|".join(map(re.escape, stop))) if stop else None
    pending = ""
    count = 0
    reason = "stop"  # end of text unless the loop breaks
    try:
        for token in stream:
            count += 1
            pending += decoder.decode(llm.detokenize([token], decode=False))
            if stop_regex is not None:
                match = stop_regex.search(pending)
                if match is not None:
                    pending = pending[: match.start()]
                    break
            # Hold back a suffix that may be the start of a stop string.
            held = 0
            for s in stop:
                for i in range(min(len(s), len(pending)), 0, -1):
                    if pending.endswith(s[:i]):
                        held = max(held, i)
                        break
            if len(pending) > held:
                emit(pending[: len(pending) - held])
                pending = pending[len(pending) - held :]
            if cancelled.is_set():
                reason = "cancelled"
                break
            if count >= budget:
                reason = "length"
                break
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    if reason != "cancelled":
        pending += decoder.decode(b"", final=True)
        if pending:
            emit(pending)
    return count, reason
