"""Limits on the daemon's HTTP connections: at most `limit` open at once, well below the
process's file descriptor limit, so a flood of slow clients can never make `accept` fail with
EMFILE (or starve model files, workers and downloads of descriptors).

hypercorn builds its listeners itself (`trio.SocketListener(...)` in hypercorn.trio.run) and has
no connection limit, so `cap_connections` hands that module a trio whose SocketListener is
CappedListener. Connections beyond the limit wait in the kernel's backlog until one closes;
reaching the limit is logged (`connection_limit_reached`) at most once a minute, not per accept.
"""

from __future__ import annotations

import logging
import resource
import types
from collections.abc import Callable

import structlog
import trio

log = structlog.get_logger("modeld.http")

FD_RESERVE = 256  # descriptors kept for model files, workers, downloads, logs
RECEIVE_BYTES = 1024 * 1024  # bytes asked of the kernel per read of a connection


def connection_limit(configured: int) -> int:
    """`configured`, lowered to stay FD_RESERVE below the soft descriptor limit (at least 8)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(8, min(configured, soft - FD_RESERVE))


class _CountedStream(trio.abc.HalfCloseableStream):
    """A connection that gives its slot back when it is closed (once). It offers what
    hypercorn's TCPServer uses of a trio.SocketStream (which cannot be subclassed)."""

    def __init__(self, inner: trio.SocketStream, release: Callable[[], None]) -> None:
        self.inner = inner
        self.socket = inner.socket
        self._release: Callable[[], None] | None = release

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        # hypercorn asks for 64 KiB at a time and hands whatever comes to h11, which takes any
        # amount: reading up to RECEIVE_BYTES makes a large upload's per-read work (h11,
        # hypercorn, quart, the event loop) 16 times rarer. Only hypercorn reads this stream.
        return await self.inner.receive_some(max(max_bytes or 0, RECEIVE_BYTES))

    async def aclose(self) -> None:
        release, self._release = self._release, None
        try:
            await self.inner.aclose()
        finally:
            if release is not None:
                release()


class _Slots:
    """The connection slots of the daemon's listeners. Reaching the limit is logged at most
    once every LOG_EVERY seconds, however many connections wait."""

    LOG_EVERY = 60.0

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.semaphore = trio.Semaphore(limit)
        self.logged_at: float | None = None

    async def acquire(self) -> None:
        if self.semaphore.value == 0:
            now = trio.current_time()
            if self.logged_at is None or now - self.logged_at >= self.LOG_EVERY:
                self.logged_at = now
                log.warning("connection_limit_reached", limit=self.limit)
        await self.semaphore.acquire()

    def release(self) -> None:
        self.semaphore.release()


class CappedListener(trio.abc.Listener[_CountedStream]):
    def __init__(self, inner: trio.SocketListener, slots: _Slots) -> None:
        self.inner = inner
        self.socket = inner.socket
        self._slots = slots

    async def accept(self) -> _CountedStream:
        await self._slots.acquire()
        try:
            stream = await self.inner.accept()
        except BaseException:
            self._slots.release()
            raise
        return _CountedStream(stream, self._slots.release)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _NoTraceback(logging.Filter):
    """trio retries an accept that failed with EMFILE and logs each retry with a traceback;
    one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


def cap_connections(limit: int) -> None:
    """Make hypercorn's listeners hold at most `limit` connections at once (all together)."""
    import hypercorn.trio.run as hypercorn_run

    slots = _Slots(limit)
    proxy = types.ModuleType("trio")
    proxy.__dict__.update(trio.__dict__)
    proxy.SocketListener = lambda sock: CappedListener(trio.SocketListener(sock), slots)  # type: ignore[attr-defined]
    hypercorn_run.trio = proxy  # type: ignore[attr-defined]
    logging.getLogger("trio.serve_listeners").addFilter(_NoTraceback())
