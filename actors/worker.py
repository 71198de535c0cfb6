"""Parent side of an inference worker process: spawn, request/response, kill.

One worker process holds one loaded model (see actors/worker_main.py for the child). Model
runtimes never run in the daemon: a crash in the runtime kills the worker, and the owner sees
it through `Worker.wait_exited()` or `WorkerDied` from a request.

The child's stderr (and what its C runtime prints to stdout, which the child redirects there)
goes to an unlinked temporary file, not a pipe: nobody has to drain it, so the child can never
block on a full pipe, and no background task is needed. Its tail is read only for error
messages (`Worker.stderr_tail()`). The file lives as long as the worker.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import IO

import trio

from actors.children import open_child
from actors.frames import MAX_FRAME, Frame, FrameCut, FrameError, FrameReader
from actors.worker_protocol import (
    Embeddings,
    GenerateParams,
    GenerationResult,
    WorkerDied,
    WorkerError,
    WorkerExiting,
    WorkerInfo,
    WorkerRequestError,
    WorkerStartError,
    describe_exit,
    encode_message,
)

STDERR_TAIL_BYTES = 4096
# How long a cancelled request may take to reach "done" before the worker counts as wedged
# and is killed. ctransformers stops between pieces: one token's time plus slack. llama.cpp
# stops between prompt batches (actors/backends/llamacpp.py), and one batch of a large model
# on a slow CPU takes many seconds; killing the worker there would end the other slots'
# requests and unload the model because one client left.
CANCEL_DRAIN_SECONDS = 5.0
CANCEL_DRAIN_SECONDS_BY_RUNTIME = {"llama.cpp": 120.0}
# After SIGKILL, how long reaping may take before we give up waiting (it should be instant).
REAP_SECONDS = 5.0

__all__ = [
    "MAX_FRAME",
    "Embeddings",
    "Frame",
    "FrameReader",
    "GenerateParams",
    "Generation",
    "GenerationResult",
    "Worker",
    "WorkerDied",
    "WorkerError",
    "WorkerExiting",
    "WorkerInfo",
    "WorkerRequestError",
    "WorkerStartError",
    "describe_exit",
    "open_worker",
]


class Worker:
    """A running worker process with a loaded model. Made by `open_worker`.

    `info.parallel` requests at a time (one for ctransformers): more `generate` streams wait
    for one to finish. Frames of requests running together are told apart by their id: the
    task that reads hands the others' frames to their mailboxes.
    Close with `aclose()`, which always reaps the process.
    """

    def __init__(self, process: trio.Process, stderr_file: IO[bytes], *,
                 cancel_drain: float = CANCEL_DRAIN_SECONDS) -> None:
        assert process.stdin is not None and process.stdout is not None
        self._process = process
        self.cancel_drain = cancel_drain
        self._stdin: trio.abc.SendStream = process.stdin
        self._reader = FrameReader(process.stdout)
        self._stderr_file = stderr_file
        self._send_lock = trio.Lock()
        self._read_lock = trio.Lock()
        self._mailboxes: dict[int, deque[Frame]] = {}
        # A Semaphore, not a Lock: a stream may be opened in one task and closed in another
        # (a Lock insists that its owner releases it). Resized once the worker is ready.
        self._request_slot = trio.Semaphore(1)
        self._next_id = 1
        self._closing = False
        self.info = WorkerInfo(pid=process.pid, context_length=0, vocab_size=0, load_seconds=0.0)
        self.last_result: GenerationResult | None = None

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has been reaped, else None."""
        return self._process.returncode

    def stderr_tail(self, limit: int = STDERR_TAIL_BYTES) -> str:
        """The last `limit` bytes the child wrote to stderr (or to stdout from C code).

        Reads a local temporary file with pread (the child shares the file offset, so no seek);
        a few KB from the page cache, cheap enough to do inline.
        """
        try:
            fd = self._stderr_file.fileno()
            size = os.fstat(fd).st_size
            data = os.pread(fd, limit, max(0, size - limit))
        except (OSError, ValueError):
            return ""
        return data.decode(errors="replace")

    def generate(self, prompt: str, params: GenerateParams) -> Generation:
        """A stream of text pieces generated from prompt. Nothing is sent until iterated.

        Use it as ``async with worker.generate(p, params) as stream: async for piece in
        stream: ...``; leaving the block early (break, error, cancellation) cancels the request
        in the worker and drains it, so the next request starts clean. Afterwards
        `stream.result` (and `worker.last_result`) holds the token counts and finish_reason.
        Iterating raises WorkerDied if the process exits, WorkerExiting if `aclose` stops the
        worker mid-stream (from another task; the text is then cut short), and
        WorkerRequestError if the worker refuses the request or its text cannot be encoded.
        """
        request_id = self._next_id
        self._next_id += 1
        return Generation(self, request_id, prompt, params)

    async def embed(self, texts: list[str]) -> Embeddings:
        """One embedding vector per text. Raises WorkerDied, WorkerRequestError (e.g. a
        runtime that gives no embeddings)."""
        frame = await self._call({"type": "embed", "input": list(texts)})
        return Embeddings(
            vectors=[[float(v) for v in vector] for vector in frame["vectors"]],
            prompt_tokens=int(frame["prompt_tokens"]),
        )

    async def _call(self, message: Frame) -> Frame:
        """Send one request and wait for its one answer; it holds a request slot meanwhile.
        A wait cancelled after the send leaves the answer to be dropped when it comes; a send
        cancelled halfway kills the worker (a half-written frame breaks the protocol)."""
        request_id = self._next_id
        self._next_id += 1
        data = encode_message({**message, "id": request_id})
        async with self._request_slot:
            self._mailboxes[request_id] = deque()
            try:
                try:
                    await self._send_bytes(data)
                except trio.Cancelled:
                    await self._kill_and_reap()
                    raise
                frame = await self._receive_for(request_id)
            finally:
                self._mailboxes.pop(request_id, None)
        if frame.get("type") == "error":
            raise WorkerRequestError(str(frame.get("message")))
        return frame

    async def wait_exited(self) -> int:
        """Wait until the process exits, for whatever reason, and return its returncode
        (negative: killed by that signal). Safe to call while requests are running."""
        return await self._process.wait()

    async def aclose(self, grace: float = 3.0) -> None:
        """Ask the worker to exit, wait up to grace seconds, then kill it; always reap.

        Idempotent, and completes even when the calling scope is cancelled (shielded, with
        its own deadline). A request running meanwhile ends with WorkerExiting.
        """
        self._closing = True
        with trio.CancelScope(shield=True, deadline=trio.current_time() + grace + REAP_SECONDS):
            if self._process.returncode is None:
                with trio.move_on_after(grace):
                    try:
                        await self._send({"type": "exit"})
                    except WorkerDied:
                        pass
                    await self._process.wait()
                if self._process.returncode is None:
                    self._process.kill()
                    await self._process.wait()
            await self._close_pipes()
        self._stderr_file.close()

    # -------------------------------------------------------- internals

    async def _close_pipes(self) -> None:
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                await trio.aclose_forcefully(stream)

    async def _kill_and_reap(self) -> int | None:
        """Kill the process and wait (shielded, bounded) until it is reaped."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + REAP_SECONDS):
            if self._process.returncode is None:
                self._process.kill()
            await self._process.wait()
            await self._close_pipes()
        return self._process.returncode

    async def _died(self) -> WorkerDied:
        """The exception for a worker whose stdout ended; reaps it first (bounded)."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + REAP_SECONDS):
            await self._process.wait()
        if self._process.returncode is None:
            # stdout closed but the process lingers: it is no use to anyone now.
            await self._kill_and_reap()
        returncode = self._process.returncode
        tail = self.stderr_tail().strip()
        detail = f"; stderr ends with:\n{tail}" if tail else ""
        return WorkerDied(
            f"worker {self.pid} exited ({describe_exit(returncode)}){detail}",
            returncode=returncode,
        )

    async def _gone(self) -> WorkerError:
        """The exception for a worker whose pipes ended: closed by us, or it died."""
        if self._closing:
            return WorkerExiting(f"worker {self.pid} was closed (the model was unloaded)")
        return await self._died()

    async def _send(self, message: Frame) -> None:
        await self._send_bytes(encode_message(message))

    async def _send_bytes(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self._stdin.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise await self._gone() from None

    async def _receive_for(self, request_id: int) -> Frame:
        """The next frame of request_id (registered in `_mailboxes`). Whichever waiting task
        holds the read lock reads, and files frames of other requests in their mailboxes."""
        box = self._mailboxes.setdefault(request_id, deque())
        while True:
            if box:
                return box.popleft()
            async with self._read_lock:
                if box:
                    continue  # filed by the task that read before us
                frame = await self._receive()
                owner = frame.get("id")
                if owner == request_id:
                    return frame
                other = self._mailboxes.get(owner) if isinstance(owner, int) else None
                if other is not None:
                    other.append(frame)
                # else: a frame of a request nobody waits for any more; dropped

    async def _receive(self) -> Frame:
        try:
            frame = await self._reader.receive()
        except FrameCut:
            frame = None  # it died while writing: as gone as at a frame's end
        except FrameError as exc:
            raise WorkerError(f"worker {self.pid} broke the protocol: {exc}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # Closed under us: `aclose` ran (from another task) while this one was reading.
            frame = None
        if frame is None:
            raise await self._gone()
        return frame


class Generation:
    """One generate request's stream of text pieces (see `Worker.generate`).

    An async iterator of str and an async context manager; belongs to one task at a time.
    If iterated without `async with`, iterate it to the end or call `aclose()`: an abandoned
    stream keeps the worker busy.
    """

    def __init__(
        self, worker: Worker, request_id: int, prompt: str, params: GenerateParams
    ) -> None:
        self._worker = worker
        self._id = request_id
        self._prompt = prompt
        self._params = params
        self._started = False
        self._finished = False
        self.result: GenerationResult | None = None

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> str:
        if self._finished:
            raise StopAsyncIteration
        if not self._started:
            await self._start()
        while True:
            try:
                frame = await self._worker._receive_for(self._id)
            except WorkerError:
                self._finish()
                raise
            kind = frame.get("type")
            if kind == "piece":
                return str(frame["text"])
            if kind == "done":
                self._record(frame)
                self._finish()
                if self.result is not None and self.result.finish_reason == "cancelled":
                    # Not cancelled by us (that happens only in aclose): the worker was told
                    # to exit. Text cut short must not look like a complete answer.
                    raise WorkerExiting(
                        f"worker {self._worker.pid} was stopped while generating "
                        "(the model was unloaded)"
                    )
                raise StopAsyncIteration
            if kind == "error":
                self._finish()
                raise WorkerRequestError(str(frame.get("message")))

    async def _start(self) -> None:
        p = self._params
        message: Frame = {
            "type": "generate",
            "id": self._id,
            "prompt": self._prompt,
            "max_new_tokens": p.max_new_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": p.top_k,
            "seed": p.seed,
            "stop": list(p.stop),
        }
        if p.messages is not None:
            message["messages"] = [{"role": r, "content": c} for r, c in p.messages]
        if p.json_schema is not None:
            message["json_schema"] = p.json_schema
        data = encode_message(message)
        await self._worker._request_slot.acquire()
        self._worker._mailboxes[self._id] = deque()
        self._started = True
        try:
            await self._worker._send_bytes(data)
        except BaseException:
            # Cancelled mid-send or the worker died: the frame may be half written, so the
            # worker cannot be trusted with another request. Killing it makes that loud.
            await self._worker._kill_and_reap()
            self._finish()
            raise

    async def aclose(self) -> None:
        """Stop the request if it is still running and drain it to its end. Idempotent.

        Shielded with its own deadline; a worker that does not finish the request within
        its cancel_drain seconds is killed (the next request then raises WorkerDied).
        """
        if self._finished:
            return
        if not self._started:
            self._finished = True
            return
        with trio.CancelScope(
            shield=True, deadline=trio.current_time() + self._worker.cancel_drain
        ) as scope:
            try:
                await self._worker._send({"type": "cancel", "id": self._id})
                while True:
                    frame = await self._worker._receive_for(self._id)
                    if frame.get("type") in ("done", "error"):
                        if frame.get("type") == "done":
                            self._record(frame)
                        break
            except WorkerError:
                pass  # the process is gone; the owner learns it from wait_exited
        if scope.cancelled_caught:
            await self._worker._kill_and_reap()
        self._finish()

    def _record(self, frame: Frame) -> None:
        self.result = GenerationResult(
            prompt_tokens=int(frame["prompt_tokens"]),
            completion_tokens=int(frame["completion_tokens"]),
            finish_reason=str(frame["finish_reason"]),
        )
        self._worker.last_result = self.result

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            if self._started:
                self._worker._mailboxes.pop(self._id, None)
                self._worker._request_slot.release()


async def open_worker(
    path: Path,
    *,
    model_type: str,
    context_length: int,
    threads: int,
    load_timeout: float,
    runtime: str = "ctransformers",
    parallel: int = 1,
    python: str = sys.executable,
) -> Worker:
    """Start a worker process that loads the model at path with `runtime` ("llama.cpp" or
    "ctransformers", see actors/backends/); return once it is ready. `parallel`: requests
    served at once (llama.cpp's slots; ctransformers always serves one).

    Raises WorkerStartError if the process cannot start, reports a load error, exits or
    crashes while loading, or is not ready within load_timeout seconds. On every failure,
    including cancellation, the child is killed and reaped before this returns.
    """
    args = ["--runtime", runtime, "--parallel", str(parallel), "--model", str(path),
            "--model-type", model_type, "--context-length", str(context_length),
            "--threads", str(threads)]
    # An unlinked temp file: creating it is a local metadata operation, not worth a thread.
    stderr_file = tempfile.TemporaryFile(prefix="modeld-worker-")
    try:
        process = await open_child("actors.worker_main", args, python=python,
                                   stderr=stderr_file.fileno())
    except BaseException as exc:
        stderr_file.close()
        if isinstance(exc, OSError):
            raise WorkerStartError(f"could not start the worker with {python}: {exc}") from exc
        raise
    worker = Worker(process, stderr_file, cancel_drain=CANCEL_DRAIN_SECONDS_BY_RUNTIME.get(
        runtime, CANCEL_DRAIN_SECONDS))
    try:
        with trio.fail_after(load_timeout):
            try:
                frame = await worker._reader.receive()
            except FrameCut:
                frame = None  # it died while writing: a crash, told below
    except FrameError as exc:
        await worker.aclose(grace=0)
        raise WorkerStartError(f"the worker loading {path} broke the protocol: {exc}") from None
    except trio.TooSlowError:
        await worker._kill_and_reap()
        note = _tail_note(worker)
        await worker.aclose(grace=0)
        raise WorkerStartError(f"{path} did not load within {load_timeout:g} s{note}") from None
    except BaseException:
        await worker.aclose(grace=0)
        raise

    if frame is not None and frame.get("type") == "ready":
        try:
            worker.info = WorkerInfo(
                pid=process.pid,
                context_length=int(frame["context_length"]),
                vocab_size=int(frame["vocab_size"]),
                load_seconds=float(frame["load_seconds"]),
                runtime=runtime,
                parallel=max(1, int(frame.get("parallel", 1))),
            )
        except (KeyError, TypeError, ValueError):
            await worker.aclose(grace=0)
            raise WorkerStartError(f"worker for {path} sent a malformed ready frame") from None
        worker._request_slot = trio.Semaphore(worker.info.parallel)
        return worker

    if frame is not None and frame.get("type") == "error":
        message = f"could not load {path}: {frame.get('message')}"
    else:
        # No answer: the child crashed (the runtime segfaults on some damaged files). Its
        # stdout is closed, so it is exiting; give it a moment so its own status is reported.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 1.0):
            await process.wait()
        await worker._kill_and_reap()
        message = (
            f"the worker loading {path} exited without answering "
            f"({describe_exit(process.returncode)}){_tail_note(worker)}"
        )
    await worker.aclose(grace=0)
    raise WorkerStartError(message)


def _tail_note(worker: Worker) -> str:
    tail = worker.stderr_tail().strip()
    return f"; stderr ends with:\n{tail}" if tail else ""
