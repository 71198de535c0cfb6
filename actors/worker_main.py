"""Child side of an inference worker: one process, one loaded model.

Run as ``python -m actors.worker_main --model PATH --model-type llama --context-length N
--threads N``. The parent (actors/worker.py) talks to it over stdin/stdout in frames of a 4-byte
big-endian length followed by UTF-8 JSON.

Parent -> child: generate, cancel, tokenize, exit.
Child -> parent: ready | error (once, after loading), then per request: piece* done | error,
or tokens.

This module uses the standard library and ctransformers only (no trio): the child stays small
and its failure modes are those of the runtime.
"""

from __future__ import annotations

import argparse
import codecs
import ctypes
import importlib.util
import json
import os
import queue
import re
import signal
import struct
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

MAX_FRAME = 64 * 1024 * 1024
EXIT_LOAD_FAILED = 1
EXIT_PROTOCOL_ERROR = 2

Frame = dict[str, Any]


# ---------------------------------------------------------------- framing


def encode_frame(message: Frame) -> bytes:
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def _read_exactly(fd: int, n: int) -> bytes | None:
    """n bytes from fd, or None on EOF (a frame cut short counts as EOF: the parent is gone)."""
    chunks: list[bytes] = []
    while n > 0:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> Frame | None:
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    (length,) = struct.unpack(">I", header)
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    body = _read_exactly(fd, length)
    if body is None:
        return None
    message = json.loads(body.decode())
    if not isinstance(message, dict):
        raise ValueError("a frame must hold a JSON object")
    return message


class FrameWriter:
    """Writes frames to the protocol fd; a lock keeps frames from two threads whole."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, message: Frame) -> None:
        data = encode_frame(message)
        with self._lock:
            self._out.write(data)
            self._out.flush()


# ---------------------------------------------------------------- runtime


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


class RequestRefused(Exception):
    """A request this model cannot serve; the worker stays up."""


class Backend:
    """One ctransformers model; every call into it holds one lock (it is not thread-safe)."""

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

    def tokenize(self, text: str) -> list[int]:
        with self._lock:
            result: list[int] = self._llm.tokenize(text)
            return result

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int,
        stop: list[str],
        cancelled: threading.Event,
        emit: Callable[[str], None],
    ) -> tuple[int, int, str]:
        """Generate from prompt, calling emit with each text piece.

        Returns (prompt_tokens, completion_tokens, finish_reason) where finish_reason is "stop"
        (end of text or a stop string), "length" (max_new_tokens or the context is full) or
        "cancelled". Raises RequestRefused when the prompt does not fit the context.
        """
        with self._lock:
            tokens = self._llm.tokenize(prompt)
            n_prompt = len(tokens)
            if n_prompt >= self.context_length:
                raise RequestRefused(
                    f"the prompt is {n_prompt} tokens but the context holds "
                    f"{self.context_length}; shorten the prompt or load the model with a "
                    "longer context"
                )
            budget = min(max_new_tokens, self.context_length - n_prompt)
            if budget <= 0:
                return n_prompt, 0, "length"
            stream: Iterator[int] = self._llm.generate(
                tokens, top_k=top_k, top_p=top_p, temperature=temperature, seed=seed, reset=True
            )
            count, reason = _stream_text(
                self._llm, stream, budget=budget, stop=stop, cancelled=cancelled, emit=emit
            )
            return n_prompt, count, reason


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


# ---------------------------------------------------------------- process


class Inbox:
    """Commands read by the reader thread; cancel/exit act at once, the rest queue up."""

    def __init__(self) -> None:
        self.commands: queue.Queue[Frame] = queue.Queue()
        self._lock = threading.Lock()
        self._cancel_events: dict[int, threading.Event] = {}

    def cancel_event(self, request_id: int) -> threading.Event:
        with self._lock:
            return self._cancel_events.setdefault(request_id, threading.Event())

    def forget(self, request_id: int) -> None:
        with self._lock:
            self._cancel_events.pop(request_id, None)

    def cancel_all(self) -> None:
        with self._lock:
            for event in self._cancel_events.values():
                event.set()

    def run_reader(self, fd: int) -> None:
        """Read commands until EOF; EOF means the parent is gone, so the process ends now."""
        try:
            while True:
                message = read_frame(fd)
                if message is None:
                    os._exit(0)
                kind = message.get("type")
                if kind == "cancel":
                    self.cancel_event(int(message["id"])).set()
                    continue
                if kind == "generate":
                    # Registered here, not when the request starts, so a cancel that arrives
                    # while the request still waits in the queue is not lost.
                    self.cancel_event(int(message["id"]))
                elif kind == "exit":
                    self.cancel_all()
                self.commands.put(message)
        except Exception as exc:  # a broken protocol leaves nothing to talk to
            print(f"modeld worker: protocol error: {exc!r}", file=sys.stderr, flush=True)
            os._exit(EXIT_PROTOCOL_ERROR)


def _piece_sender(out: FrameWriter, request_id: int) -> Callable[[str], None]:
    def emit(text: str) -> None:
        out.send({"type": "piece", "id": request_id, "text": text})

    return emit


def _serve(backend: Backend, inbox: Inbox, out: FrameWriter) -> None:
    while True:
        message = inbox.commands.get()
        kind = message.get("type")
        if kind == "exit":
            return
        request_id = message.get("id")
        try:
            if kind == "generate":
                rid = int(message["id"])
                try:
                    n_prompt, n_completion, reason = backend.generate(
                        str(message["prompt"]),
                        max_new_tokens=int(message["max_new_tokens"]),
                        temperature=float(message["temperature"]),
                        top_p=float(message["top_p"]),
                        top_k=int(message["top_k"]),
                        seed=int(message["seed"]),
                        stop=[str(s) for s in message.get("stop", [])],
                        cancelled=inbox.cancel_event(rid),
                        emit=_piece_sender(out, rid),
                    )
                finally:
                    inbox.forget(rid)
                out.send(
                    {
                        "type": "done",
                        "id": rid,
                        "prompt_tokens": n_prompt,
                        "completion_tokens": n_completion,
                        "finish_reason": reason,
                    }
                )
            elif kind == "tokenize":
                tokens = backend.tokenize(str(message["text"]))
                out.send({"type": "tokens", "id": request_id, "tokens": tokens})
            else:
                raise RequestRefused(f"unknown command type {kind!r}")
        except (RequestRefused, KeyError, ValueError, TypeError, RuntimeError) as exc:
            out.send({"type": "error", "id": request_id, "message": str(exc)})


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C at a terminal reaches the whole process group; the daemon stops its workers
    # itself (it closes their stdin), so the model is unloaded in order, not killed mid-answer.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Protocol output goes to a private copy of fd 1; fd 1 itself becomes stderr, so text the
    # C runtime prints to stdout can never corrupt a frame.
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out = FrameWriter(os.fdopen(protocol_fd, "wb", buffering=0))

    parser = argparse.ArgumentParser(prog="python -m actors.worker_main")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--model-type", default="llama")
    parser.add_argument("--context-length", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lib", default=None, help="avx2, avx or basic (default: from the CPU)")
    args = parser.parse_args(argv)

    inbox = Inbox()
    # Started before loading, so a parent that dies during a long load still takes us along.
    threading.Thread(target=inbox.run_reader, args=(0,), name="stdin", daemon=True).start()

    try:
        backend = Backend(
            args.model,
            model_type=args.model_type,
            context_length=args.context_length,
            threads=args.threads,
            lib=args.lib or pick_lib(),
        )
    except Exception as exc:
        out.send({"type": "error", "message": f"{type(exc).__name__}: {exc}"})
        return EXIT_LOAD_FAILED
    out.send(
        {
            "type": "ready",
            "context_length": backend.context_length,
            "vocab_size": backend.vocab_size,
            "load_seconds": backend.load_seconds,
        }
    )
    _serve(backend, inbox, out)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # os._exit: skip interpreter teardown with the reader thread blocked in read() and the
    # runtime's C destructors; the kernel frees the model's memory either way.
    os._exit(code)
