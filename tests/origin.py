"""A real HTTP/1.1 origin for tests: trio sockets + h11, files in memory or on disk.

It answers HEAD and GET with `Range` (one range: `bytes=a-b`, `bytes=a-`, `bytes=-n`), `If-Range`
(ETag or date), `ETag`, `Last-Modified`, `Accept-Ranges: bytes`, keep-alive, and injects faults
per path (see `Faults`). Counters (`requests`, `bytes_sent`, `active_connections`, ...) let a test
check what a client really did on the wire.

    async with open_origin() as origin:
        origin.add("/m.gguf", data)
        url = origin.url("/m.gguf")

`run_origin_in_thread()` runs the same server on its own trio loop in a thread, for code that is
not inside a trio run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import attrs
import h11
import trio

_CHUNK = 256 * 1024
Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


@attrs.define
class Faults:
    """What goes wrong on one path. `*_requests` = K applies the fault to the first K requests
    only (None: to every request)."""

    reset_after: int | None = None  # body bytes, then an abrupt close (RST)
    reset_requests: int | None = None
    stall_after: int | None = None  # body bytes, then silence with the socket kept open
    stall_requests: int | None = None
    ignore_range: bool = False  # answer 200 with the whole body to ranged requests
    status: int | None = None  # e.g. 503, 429, 404, 500
    status_requests: int | None = None
    retry_after: str | None = None  # sent with `status`
    throttle: float | None = None  # bytes per second per connection
    redirect_to: str | None = None  # a path on this origin or an absolute URL (any scheme)
    redirect_status: int = 302
    headers: list[tuple[str, str]] = attrs.Factory(list)  # sent with `status`
    # (header, value): a request that carries it is spared `status` (a gated file's token)
    spare: tuple[str, str] | None = None
    unsized: bool = False  # no Content-Length (chunked), no ranges: the size is not told
    # A probe (`Range: bytes=0-0`) is answered 200 with this Content-Length and no ranges (the
    # connection then closes); every other GET as `unsized`: a size told, then not kept.
    probe_size: int | None = None


@attrs.define
class Resource:
    data: bytes | Path
    etag: str
    last_modified: str
    faults: Faults = attrs.Factory(Faults)
    hits: int = 0

    @property
    def size(self) -> int:
        return len(self.data) if isinstance(self.data, bytes) else self.data.stat().st_size


@attrs.frozen
class Seen:
    """One request as the origin saw it."""

    method: str
    path: str
    range: str | None
    if_range: str | None
    connection: int
    at: float  # time.monotonic()
    headers: tuple[tuple[str, str], ...] = ()  # every header, names lower-case


def _etag_of(data: bytes | Path) -> str:
    tag = hashlib.sha256(data).hexdigest()[:16] if isinstance(data, bytes) else str(data.stat())
    return '"' + hashlib.sha256(tag.encode()).hexdigest()[:16] + '"'


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single `bytes=` range; None when unsatisfiable or malformed."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            return (max(0, size - n), size) if 0 < n and size > 0 else None
        start = int(first)
        end = size if last == "" else min(int(last) + 1, size)
    except ValueError:
        return None
    return (start, end) if 0 <= start < end else None


@attrs.define(eq=False)
class Origin:
    port: int = 0
    scheme: str = "http"
    resources: dict[str, Resource] = attrs.Factory(dict)
    requests: list[Seen] = attrs.Factory(list)
    bytes_sent: int = 0
    active_connections: int = 0
    max_active_connections: int = 0
    connections_opened: int = 0
    last_byte_at: float = 0.0  # time.monotonic() of the last body byte handed to the kernel
    _progress: trio.Event = attrs.Factory(trio.Event)
    _clock: int = 1_700_000_000

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def add(self, path: str, data: bytes | Path, etag: str | None = None) -> Resource:
        self._clock += 10
        res = Resource(data, etag or _etag_of(data), formatdate(self._clock, usegmt=True))
        self.resources[path] = res
        return res

    def replace(self, path: str, data: bytes | Path, etag: str | None = None) -> Resource:
        """New content (new ETag and Last-Modified) under the same path; faults and hits stay."""
        old = self.resources[path]
        new = self.add(path, data, etag)
        new.faults, new.hits = old.faults, old.hits
        return new

    def faults(self, path: str) -> Faults:
        return self.resources[path].faults

    def redirect(self, path: str, to: str, status: int = 302) -> None:
        self.resources[path] = Resource(b"", '"r"', formatdate(self._clock, usegmt=True))
        self.resources[path].faults = Faults(redirect_to=to, redirect_status=status)

    def seen(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.path == path]

    async def wait_bytes_sent(self, n: int) -> None:
        """Return once at least n body bytes went out (in total, all paths)."""
        while self.bytes_sent < n:
            await self._progress.wait()

    def _sent(self, n: int) -> None:
        self.bytes_sent += n
        self.last_byte_at = time.monotonic()
        self._progress.set()
        self._progress = trio.Event()

    async def serve_connection(self, stream: Stream) -> None:
        self.connections_opened += 1
        conn_id = self.connections_opened
        self.active_connections += 1
        self.max_active_connections = max(self.max_active_connections, self.active_connections)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await _next_event(conn, stream)
                if not isinstance(event, h11.Request):
                    return
                while not isinstance(await _next_event(conn, stream), h11.EndOfMessage):
                    pass
                if not await self._answer(conn, stream, event, conn_id):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            self.active_connections -= 1
            plain = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
            assert isinstance(plain, trio.SocketStream)
            plain.socket.close()

    async def _answer(
        self, conn: h11.Connection, stream: Stream, req: h11.Request, conn_id: int
    ) -> bool:
        """Send one response; False when the connection must end (fault injected)."""
        headers = {k.decode().lower(): v.decode() for k, v in req.headers}
        path = req.target.decode().split("?", 1)[0]
        method = req.method.decode()
        self.requests.append(
            Seen(method, path, headers.get("range"), headers.get("if-range"), conn_id,
                 time.monotonic(), tuple(headers.items()))
        )
        res = self.resources.get(path)
        if res is None:
            await _send_simple(conn, stream, 404, [])
            return True
        res.hits += 1
        f = res.faults

        def applies(k: int | None) -> bool:
            return k is None or res.hits <= k

        spared = f.spare is not None and headers.get(f.spare[0]) == f.spare[1]
        if f.status is not None and applies(f.status_requests) and not spared:
            extra = [("Retry-After", f.retry_after)] if f.retry_after is not None else []
            extra += f.headers
            await _send_simple(conn, stream, f.status, extra)
            return True
        if f.redirect_to is not None:
            to = f.redirect_to if "://" in f.redirect_to else self.url(f.redirect_to)
            await _send_simple(conn, stream, f.redirect_status, [("Location", to)])
            return True

        if f.probe_size is not None and headers.get("range") == "bytes=0-0":
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                ("Content-Length", str(f.probe_size)), ("ETag", res.etag)])))
            return False
        size = res.size
        start, end, status = 0, size, 200
        wanted = headers.get("range")
        if_range = headers.get("if-range")
        unsized = f.unsized or f.probe_size is not None
        if wanted is not None and not f.ignore_range and not unsized and if_range in (
                None, res.etag, res.last_modified):
            rng = parse_range(wanted, size)
            if rng is None:
                await _send_simple(conn, stream, 416, [("Content-Range", f"bytes */{size}")])
                return True
            (start, end), status = rng, 206
        out = [
            ("Content-Length", str(end - start)),
            ("Accept-Ranges", "bytes"),
            ("ETag", res.etag),
            ("Last-Modified", res.last_modified),
            ("Content-Type", "application/octet-stream"),
        ]
        if status == 206:
            out.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
        if unsized:
            out = [(k, v) for k, v in out if k not in ("Content-Length", "Accept-Ranges")]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=out)))
        if method == "HEAD":
            await stream.send_all(conn.send(h11.EndOfMessage()))
            return True

        limit = end - start
        reset = f.reset_after is not None and applies(f.reset_requests)
        stall = f.stall_after is not None and applies(f.stall_requests)
        if reset:
            limit = min(limit, f.reset_after or 0)
        if stall:
            limit = min(limit, f.stall_after or 0)
        began = time.monotonic()
        sent = 0
        while sent < limit:
            n = min(_CHUNK, limit - sent)
            if f.throttle:
                n = min(n, max(1, int(f.throttle / 20)))
            chunk = await _read(res.data, start + sent, n)
            await stream.send_all(conn.send(h11.Data(data=chunk)))
            sent += len(chunk)
            self._sent(len(chunk))
            if f.throttle:
                await trio.sleep(max(0.0, began + sent / f.throttle - time.monotonic()))
        if sent < end - start:
            if stall:
                # Keep the socket open and silent until the client gives up on it.
                while await stream.receive_some(_CHUNK):
                    pass
            else:
                # SO_LINGER 0: close() sends an RST, as a crashed peer or a cut proxy would.
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return True


async def _read(data: bytes | Path, offset: int, n: int) -> bytes:
    if isinstance(data, bytes):
        return data[offset : offset + n]

    def pread() -> bytes:
        fd = os.open(data, os.O_RDONLY)
        try:
            return os.pread(fd, n, offset)
        finally:
            os.close(fd)

    return await trio.to_thread.run_sync(pread)


async def _next_event(conn: h11.Connection, stream: Stream) -> object:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(_CHUNK))
            continue
        return event


async def _send_simple(
    conn: h11.Connection, stream: Stream, status: int, extra: list[tuple[str, str]]
) -> None:
    body = f"status {status}\n".encode()
    headers = [("Content-Length", str(len(body))), ("Content-Type", "text/plain"), *extra]
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


@contextlib.asynccontextmanager
async def open_origin(tls: ssl.SSLContext | None = None) -> AsyncIterator[Origin]:
    """Serve on 127.0.0.1 (a free port) until the block ends; connections are closed then.
    With `tls` (a server context), over https."""
    listeners: list[Any]
    if tls is None:
        listeners = list(await trio.open_tcp_listeners(0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
    else:
        listeners = list(await trio.open_ssl_over_tcp_listeners(
            0, tls, host="127.0.0.1", https_compatible=True))
        port = listeners[0].transport_listener.socket.getsockname()[1]
    origin = Origin(port=port, scheme="http" if tls is None else "https")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, origin.serve_connection, listeners)
        try:
            yield origin
        finally:
            nursery.cancel_scope.cancel()


@contextlib.contextmanager
def run_origin_in_thread() -> Iterator[Origin]:
    """The same origin on its own trio loop in a daemon thread (for synchronous callers).
    `wait_bytes_sent` belongs to that loop; counters and `add` are safe to use from here."""
    handed: queue.Queue[tuple[Origin, trio.lowlevel.TrioToken]] = queue.Queue()
    stop = threading.Event()

    async def main() -> None:
        async with open_origin() as origin:
            handed.put((origin, trio.lowlevel.current_trio_token()))
            await trio.to_thread.run_sync(stop.wait)

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    origin, _token = handed.get(timeout=10)
    try:
        yield origin
    finally:
        stop.set()
        thread.join(timeout=10)


def make_certificate(where: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl), and its key."""
    cert, key = where / "origin.pem", where / "origin.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=modeld test origin", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key
