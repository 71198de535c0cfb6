"""Parent side of a download's byte pump: a child process (actors/pump_main.py) that moves
every body byte from sockets to the partial file (judging each response head by the daemon's
own rules, actors/heads.py) and hashes its front, while the daemon decides which ranges to
fetch, retries, and records progress.

The bytes never enter the daemon's process, so its interpreter lock and its event loop are free
for requests however many downloads run (see BENCHMARKS.md). A cancel is one `stop` frame: the
child aborts the connection under its thread, and the origin sees it go within milliseconds.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from actors.children import open_child
from actors.frames import Frame, FrameCut, FrameError, FrameReader, encode_frame

STOP_GRACE = 1.0  # seconds a stopped pump (or the child at exit) gets before being given up


class Cursor(Protocol):
    pos: int


class PumpFailed(Exception):
    """A pump ended without its range: `kind` is `transient` (network; retry), `disk`
    (`errno` tells which), `full`, `size`, `slow` (under min_rate), `refused` (the address
    rule, actors/addresses.py),
    `changed` or `origin` (the response head was refused, see
    actors.heads.Refused: `status`, `retry_after`) or `died` (the child process is gone: this
    attempt cannot go on)."""

    def __init__(self, kind: str, reason: str, errno: int = 0, *, status: int = 0,
                 retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.errno = kind, reason, errno
        self.status, self.retry_after = status, retry_after


class _Job:
    def __init__(self, at: Cursor, moved: Callable[[], None]) -> None:
        self.at = at
        self.moved = moved
        self.send, self.receive = trio.open_memory_channel[Frame](math.inf)


class PumpProcess:
    """One child per download attempt; made by `with_pump`."""

    def __init__(self, process: trio.Process) -> None:
        self._process = process
        assert process.stdout is not None
        self._reader = FrameReader(process.stdout)
        self._send_lock = trio.Lock()
        self._jobs: dict[int, _Job] = {}
        self._next_id = 0
        self._hash_lock = trio.Lock()
        self._hash_send, self._hash_receive = trio.open_memory_channel[Frame](math.inf)
        self._alive = True
        self._gone = "the download's pump process exited unexpectedly"
        self.hashed = 0  # bytes [0, hashed) are in the child's running sha256
        self.spliced = 0  # bodies the child moved by splice(2)
        self.handed = 0  # bytes the child handed to the disk as they came (sync_file_range)

    # -- requests

    async def _send(self, frame: Frame) -> None:
        if not self._alive:
            return
        assert self._process.stdin is not None
        async with self._send_lock:
            # Never cut a frame in half by a cancel; a child that stops reading for a second is
            # as good as gone (its stream may now hold half a frame).
            with trio.CancelScope(shield=True, deadline=trio.current_time() + STOP_GRACE) as scope:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._process.stdin.send_all(encode_frame(frame))
            if scope.cancelled_caught:  # the reader then sees it exit and fails every job
                self._alive = False
                self._process.kill()

    async def fetch(self, *, scheme: str, host: str, port: int, target: str, netloc: str,
                    headers: dict[str, str], at: Cursor, end: int | None,
                    stall_timeout: float, moved: Callable[[], None], total: int | None,
                    etag: str | None, ranged: bool, cap: int | None = None,
                    min_free: int = 0, private_ok: bool = True, overlap: int = 0,
                    min_rate: float = 0.0, rate_window: float = 30.0) -> None:
        """GET the file from `at.pos` to `end` (None: to the end of the body) into the file;
        `at.pos` follows what is written, and `moved()` is called whenever it moves. The
        response head must be exactly that range of a file of `total` bytes and ETag `etag`
        (`ranged`), or the whole file (actors.heads.judge_body). Raises PumpFailed when the
        pump ends early. Whatever ends this, the child's thread has stopped writing when it
        returns."""
        if not self._alive:
            raise PumpFailed("died", self._gone)
        self._next_id += 1
        job_id, job = self._next_id, _Job(at, moved)
        self._jobs[job_id] = job
        sent = ended = False
        try:
            await self._send({"op": "pump", "id": job_id, "scheme": scheme, "host": host,
                              "port": port, "target": target, "netloc": netloc,
                              "headers": [[k, v] for k, v in headers.items()],
                              "start": at.pos, "end": end, "timeout": stall_timeout,
                              "total": total, "etag": etag, "ranged": ranged,
                              "cap": cap, "min_free": min_free, "private_ok": private_ok,
                              "overlap": overlap, "min_rate": min_rate,
                              "rate_window": rate_window})
            sent = True
            frame = await job.receive.receive()
            ended = True
            kind = str(frame["end"])
            if kind in ("ok", "stopped"):
                self.spliced += bool(frame.get("spliced"))
                self.handed += int(frame.get("handed") or 0)
                return
            retry_after = frame.get("retry_after")
            raise PumpFailed(kind, str(frame.get("reason") or kind),
                             int(frame.get("errno") or 0), status=int(frame.get("status") or 0),
                             retry_after=None if retry_after is None else float(retry_after))
        finally:
            if sent and not ended:
                # Cancelled: stop the thread and wait for its last position, so that what it
                # wrote is recorded. Shielded and bounded.
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_GRACE):
                    await self._send({"op": "stop", "id": job_id})
                    await job.receive.receive()
            del self._jobs[job_id]

    async def hash_upto(self, target: int) -> int:
        """Extend the child's running sha256 to byte `target` (or the end of the file);
        returns how far it reaches. Raises OSError for a read error."""
        reply = await self._hash_request({"op": "hash", "upto": target})
        self.hashed = int(reply["hashed"])
        if reply.get("errno"):
            raise OSError(int(reply["errno"]), str(reply.get("reason")))
        return self.hashed

    async def hash_reset(self) -> None:
        self.hashed = 0
        await self._send({"op": "hash_reset"})

    async def hexdigest(self) -> str:
        return str((await self._hash_request({"op": "digest"}))["digest"])

    async def _hash_request(self, frame: Frame) -> Frame:
        async with self._hash_lock:
            if not self._alive:
                raise PumpFailed("died", self._gone)
            await self._send(frame)
            reply = await self._hash_receive.receive()
        if "hashed" not in reply and "digest" not in reply:
            raise PumpFailed("died", str(reply.get("reason") or self._gone))
        return reply

    # -- the child's frames

    async def _read(self, scope: trio.CancelScope) -> None:
        reason = self._gone
        try:
            with scope:
                while True:
                    frame = await self._reader.receive()
                    if frame is None:
                        break
                    self._dispatch(frame)
        except FrameCut:
            pass  # it died while writing a frame: gone, as at a frame's end
        except (FrameError, KeyError, TypeError, ValueError) as exc:
            reason = f"the download's pump process broke the protocol: {exc}"
        finally:
            self._alive, self._gone = False, reason
            for job in self._jobs.values():
                job.send.send_nowait({"end": "died", "reason": reason})
            self._hash_send.send_nowait({"reason": reason})

    def _dispatch(self, frame: Frame) -> None:
        if "id" not in frame:
            self._hash_send.send_nowait(frame)
            return
        job = self._jobs.get(int(frame["id"]))
        if job is None:
            return
        if "pos" in frame and int(frame["pos"]) > job.at.pos:
            job.at.pos = int(frame["pos"])
            job.moved()
        if "end" in frame:
            job.send.send_nowait(frame)


async def with_pump(fd: int, body: Callable[[PumpProcess], Awaitable[None]],
                    python: str = sys.executable) -> None:
    """Run `body` with a pump child writing to (and hashing) the open file `fd`; the child is
    stopped and reaped when `body` ends, however it ends. `body`'s exception propagates as
    itself, never inside an exception group. Raises PumpFailed (`died`) when the child cannot
    start."""
    try:
        process = await open_child("actors.pump_main", [str(fd)], python=python,
                                   pass_fds=(fd,))
    except OSError as exc:
        raise PumpFailed("died", f"cannot start the download's pump process ({python}): "
                         f"{exc.strerror or exc}") from None
    pump = PumpProcess(process)
    failure: Exception | None = None
    try:
        async with trio.open_nursery() as nursery:
            # Shielded: while a cancelled download stops its pumps, their last frames must
            # still be read. Cancelled here, once the pumps have stopped.
            reading = trio.CancelScope(shield=True)
            nursery.start_soon(pump._read, reading)
            try:
                await body(pump)
            except Exception as exc:
                failure = exc  # raised below, not as an exception group
            finally:
                reading.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await _stop(process)
    if failure is not None:
        raise failure


async def _stop(process: trio.Process) -> None:
    """Close the child's stdin (it exits at once), wait a moment, then kill; always reaped."""
    if process.stdin is not None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await process.stdin.aclose()
    with trio.move_on_after(STOP_GRACE):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
    if process.stdout is not None:
        await process.stdout.aclose()
