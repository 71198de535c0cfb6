"""Child side of an inference worker: one process, one loaded model.

Run as ``python -m actors.worker_main --runtime llama.cpp --model PATH --context-length N
--threads N --parallel N``. The parent (actors/worker.py) talks to it over stdin/stdout in
frames (actors/frames.py).

Parent -> child: generate, cancel, embed, exit.
Child -> parent: ready | error (once, after loading), then per request: piece* done | error,
or embeddings. Frames of requests running together interleave; each carries its id.

The runtime is a backend (actors/backends/): ctransformers serves one request at a time,
llama.cpp as many as it has slots, each in its own serving thread here. This module uses the
standard library and the runtime only (no trio): the child stays small and its failure modes
are those of the runtime.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from actors.backends import Backend, GenerateRequest, RequestRefused, open_backend
from actors.frames import Frame, FrameWriter, read_frame

EXIT_LOAD_FAILED = 1
EXIT_PROTOCOL_ERROR = 2

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
    """One serving thread: take commands until exit (which it passes on to the others)."""
    while True:
        message = inbox.commands.get()
        kind = message.get("type")
        if kind == "exit":
            inbox.commands.put(message)
            return
        request_id = message.get("id")
        try:
            if kind == "generate":
                rid = int(message["id"])
                try:
                    n_prompt, n_completion, reason = backend.generate(
                        GenerateRequest.from_frame(message),
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
            elif kind == "embed":
                vectors, n_tokens = backend.embed([str(t) for t in message["input"]])
                out.send(
                    {
                        "type": "embeddings",
                        "id": request_id,
                        "vectors": vectors,
                        "prompt_tokens": n_tokens,
                    }
                )
            else:
                raise RequestRefused(f"unknown command type {kind!r}")
        except (RequestRefused, KeyError, ValueError, TypeError, RuntimeError) as exc:
            out.send({"type": "error", "id": request_id, "message": str(exc)})


def serve_all(backend: Backend, inbox: Inbox, out: FrameWriter) -> None:
    """Serve with backend.parallel threads (one: requests strictly one after another)."""
    threads = [
        threading.Thread(target=_serve, args=(backend, inbox, out), name=f"slot-{i}", daemon=True)
        for i in range(max(1, backend.parallel))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


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
    parser.add_argument("--runtime", choices=("llama.cpp", "ctransformers"), default="llama.cpp")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--model-type", default="llama")
    parser.add_argument("--context-length", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1, help="requests served at once")
    parser.add_argument("--lib", default=None, help="avx2, avx or basic (default: from the CPU)")
    args = parser.parse_args(argv)

    inbox = Inbox()
    # Started before loading, so a parent that dies during a long load still takes us along.
    threading.Thread(target=inbox.run_reader, args=(0,), name="stdin", daemon=True).start()

    try:
        backend = open_backend(
            args.runtime,
            args.model,
            model_type=args.model_type,
            context_length=args.context_length,
            threads=args.threads,
            parallel=args.parallel,
            lib=args.lib,
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
            "parallel": backend.parallel,
        }
    )
    serve_all(backend, inbox, out)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # os._exit: skip interpreter teardown with the reader thread blocked in read() and the
    # runtime's C destructors; the kernel frees the model's memory either way.
    os._exit(code)
