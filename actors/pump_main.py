"""Child side of a download's byte pump: one process per download attempt, holding the
partial file's descriptor (inherited; its number is the one argument).

Run as ``python -m actors.pump_main FD`` by actors/pump.py. It moves the body bytes of ranged GETs
from a socket to the partial file (`recv_into` then `pwrite`, one thread per connection) and
hashes the file's complete front; the daemon decides everything else (which ranges, whether an
answer is acceptable, retries) and records progress. Keeping the bytes out of the daemon's
process keeps them away from its interpreter lock: the event loop answers requests at once
however many downloads run.

Frames as in actors/frames.py.
Parent -> child:
  pump {id, scheme, host, port, target, netloc, headers: [[k, v]...], start, end, timeout,
        total, etag}           a response that is exactly [start, end) of that file goes on
  go {id} | stop {id}          the verdict on any other response head, or stop at once
  hash {upto} | hash_reset {}  extend (or restart) the running sha256 of bytes [0, hashed)
  digest {}
Child -> parent:
  {id, head: {status, headers}}   an unexpected response head; the pump waits for go or stop
  {id, pos}                        bytes [start, pos) are written (at most every 50 ms)
  {id, end: ok|stopped|transient|disk, pos, reason, errno}   the pump's last frame
  {hashed, errno?, reason?} | {digest, hashed}
The child exits when its stdin closes (the parent is done or gone).

Standard library plus h11 and certifi: the child starts in a few tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import mmap
import os
import queue
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import cast

import certifi
import h11

from actors.frames import Frame, FrameError, FrameWriter, read_frame

PUMP_BUFFER = 1024 * 1024
HASH_CHUNK = 8 * 1024 * 1024
REPORT_EVERY = 0.05  # seconds between progress frames of one pump
# Writing and hashing model files can use a whole core; the daemon's event loop must get the
# CPU at once to answer requests. Raising one's own niceness needs no privilege.
NICENESS = 10


@functools.cache
def tls_context() -> ssl.SSLContext:
    """How downloads check origins' certificates: the CA bundle in $SSL_CERT_FILE when set
    (a local mirror, a company CA), else certifi's (as httpx); hostnames always checked."""
    return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or certifi.where())


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", function)


_sync_file_range = _libc_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing [offset, offset + length) to the disk without waiting (Linux), so that the
    fsync before publishing finds little left to write. Best effort: a no-op elsewhere."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """(first, last, total or None) of `bytes first-last/total`; first = last = -1 for
    `bytes */total`."""
    if value is None:
        return None
    unit, _, rest = value.strip().partition(" ")
    span, _, total = rest.partition("/")
    first, _, last = span.partition("-")
    try:
        if unit != "bytes":
            return None
        size = None if total == "*" else int(total)
        if span == "*":
            return -1, -1, size
        return int(first), int(last), size
    except ValueError:
        return None


def expected_answer(msg: Frame, pos: int, headers: list[tuple[str, str]], status: int) -> bool:
    """Whether a response head is exactly the range asked for: then the pump goes on without
    asking the parent. Anything else is judged by the parent (which holds every rule: errors,
    retries, a changed file), so this check may only ever be stricter than the parent's."""
    total, etag = msg.get("total"), msg.get("etag")
    if status != 206 or total is None:
        return False
    fields: dict[str, list[str]] = {}
    for name, value in headers:
        fields.setdefault(name.lower(), []).append(value.strip())
    ranges = fields.get("content-range", [])
    if len(ranges) != 1:
        return False
    crange = content_range(ranges[0])
    if crange is None or crange[0] != pos or crange[2] != total:
        return False
    if etag and any(value != etag for value in fields.get("etag", [])):
        return False
    if any(value.lower() != "identity" for value in fields.get("content-encoding", [])):
        return False
    return not any("chunked" in value.lower() for value in fields.get("transfer-encoding", []))


class _Stopped(Exception):
    pass


class _Failed(Exception):
    def __init__(self, kind: str, reason: str, errno: int = 0) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.errno = kind, reason, errno


class _Pump:
    """One ranged GET: [start, end) of the file, over a socket of its own."""

    def __init__(self, server: Server, msg: Frame) -> None:
        self.server = server
        self.id = int(msg["id"])
        self.msg = msg
        self.pos = int(msg["start"])
        self.end = int(msg["end"])
        self.stop = threading.Event()
        self.decided = threading.Event()
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()

    def halt(self) -> None:
        """Stop within one read: the flag, and the socket shut down under the thread.

        The close that follows is abortive (an RST, as when a process dies): a graceful FIN
        to an origin that is blocked on a full window would leave it waiting on zero-window
        probes for a second or so before it notices."""
        self.stop.set()
        self.decided.set()
        with self.lock:
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
                    # The plain socket call, under TLS too: it wakes a thread blocked in a read.
                    socket.socket.shutdown(self.sock, socket.SHUT_RD)

    def run(self) -> None:
        end: Frame
        try:
            self._fetch()
            end = {"end": "ok" if self.pos >= self.end else "stopped"}
        except _Stopped:
            end = {"end": "stopped"}
        except _Failed as exc:
            end = {"end": "stopped"} if self.stop.is_set() else {
                "end": exc.kind, "reason": exc.reason, "errno": exc.errno}
        except Exception as exc:  # never a silent thread death: the parent waits for `end`
            end = {"end": "transient", "reason": f"{type(exc).__name__}: {exc}"}
        self.server.finished(self, end)

    def _fetch(self) -> None:
        msg = self.msg
        host, port, timeout = str(msg["host"]), int(msg["port"]), float(msg["timeout"])
        try:
            raw = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise _Failed("transient",
                          f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        sock: socket.socket = raw
        with self.lock:
            self.sock = raw
        try:
            if self.stop.is_set():
                raise _Stopped()
            if msg["scheme"] == "https":
                sock = tls_context().wrap_socket(raw, server_hostname=host)  # takes raw's fd
                with self.lock:
                    self.sock = sock
                if self.stop.is_set():
                    raise _Stopped()
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(method="GET", target=str(msg["target"]), headers=[
                ("Host", str(msg["netloc"])), ("User-Agent", "modeld"),
                ("Accept-Encoding", "identity"),
                *((str(k), str(v)) for k, v in msg["headers"])])
            sock.sendall(conn.send(request) + conn.send(h11.EndOfMessage()))
            response = self._head(conn, sock)
            head = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers]
            if not expected_answer(msg, self.pos, head, response.status_code):
                self.server.send({"id": self.id, "head": {
                    "status": response.status_code, "headers": [list(h) for h in head]}})
                self.decided.wait()
            if self.stop.is_set():
                raise _Stopped()
            # What h11 already holds, then the socket directly.
            while self.pos < self.end:
                event = conn.next_event()
                if event is h11.NEED_DATA or isinstance(event, h11.EndOfMessage):
                    break
                if isinstance(event, h11.Data):
                    self._write(memoryview(event.data)[: self.end - self.pos])
            buffer = memoryview(bytearray(PUMP_BUFFER))
            reported = time.monotonic()
            while self.pos < self.end and not self.stop.is_set():
                n = sock.recv_into(buffer[: min(PUMP_BUFFER, self.end - self.pos)])
                if not n:
                    raise _Failed("transient", "the origin closed the connection early")
                self._write(buffer[:n])  # kept even when told to stop
                now = time.monotonic()
                if now - reported >= REPORT_EVERY:
                    reported = now
                    self.server.send({"id": self.id, "pos": self.pos})
        except TimeoutError:
            raise _Failed("transient", f"no data for {timeout:g} s") from None
        except (OSError, h11.ProtocolError) as exc:
            raise _Failed("transient", f"{type(exc).__name__}: {exc}") from None
        finally:
            sock.close()

    def _head(self, conn: h11.Connection, sock: socket.socket) -> h11.Response:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                if not data:
                    raise _Failed("transient", "the origin closed the connection before answering")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                return event
            elif not isinstance(event, h11.InformationalResponse):
                raise _Failed("transient", f"unexpected {type(event).__name__} from the origin")

    def _write(self, data: memoryview) -> None:
        pos = self.pos
        try:
            while data:
                n = os.pwrite(self.server.fd, data, pos)
                pos += n
                data = data[n:]
        except OSError as exc:
            raise _Failed("disk", exc.strerror or str(exc), exc.errno or 0) from None
        finally:
            self.pos = pos


class Server:
    def __init__(self, fd: int, out: FrameWriter) -> None:
        self.fd = fd
        self.out = out
        self.pumps: dict[int, _Pump] = {}
        self.lock = threading.Lock()
        self.hash_jobs: queue.SimpleQueue[Frame] = queue.SimpleQueue()

    def send(self, frame: Frame) -> None:
        self.out.send(frame)

    def finished(self, pump: _Pump, end: Frame) -> None:
        with self.lock:
            self.pumps.pop(pump.id, None)
        self.send({"id": pump.id, "pos": pump.pos, "reason": "", "errno": 0, **end})

    def serve(self) -> None:
        threading.Thread(target=self._hash_loop, name="hash", daemon=True).start()
        while True:
            msg = read_frame(0)
            if msg is None:
                return
            op = msg.get("op")
            if op == "pump":
                pump = _Pump(self, msg)
                with self.lock:
                    self.pumps[pump.id] = pump
                threading.Thread(target=pump.run, name=f"pump-{pump.id}", daemon=True).start()
            elif op in ("go", "stop"):
                with self.lock:
                    found = self.pumps.get(int(msg["id"]))
                if found is None:
                    if op == "stop":  # never started, or ended: its last frame is sent or now
                        self.send({"id": int(msg["id"]), "end": "stopped"})
                    continue
                if op == "go":
                    found.decided.set()
                else:
                    found.halt()
            elif op in ("hash", "hash_reset", "digest"):
                self.hash_jobs.put(msg)

    def _hash_loop(self) -> None:
        hasher, hashed = hashlib.sha256(), 0
        while True:
            msg = self.hash_jobs.get()
            op = msg["op"]
            if op == "hash_reset":
                hasher, hashed = hashlib.sha256(), 0
            elif op == "digest":
                self.send({"digest": hasher.hexdigest(), "hashed": hashed})
            else:
                reply: Frame = {}
                try:
                    hashed = self._hash(hasher, hashed, int(msg["upto"]))
                except OSError as exc:
                    reply = {"errno": exc.errno or 0, "reason": exc.strerror or str(exc)}
                self.send({"hashed": hashed, **reply})

    def _hash(self, hasher: hashlib._Hash, hashed: int, upto: int) -> int:
        """Extend `hasher` from byte `hashed` to `upto` (or the end of the file); returns how
        far it got. The bytes are read where they lie, in the page cache, through a read-only
        map of one chunk at a time: no copy, and no more than a chunk of the file counted in
        this process's resident memory. A file shortened under the map would kill this
        process with SIGBUS, which the parent sees as a failed attempt."""
        upto = min(upto, os.fstat(self.fd).st_size)
        while hashed < upto:
            base = hashed - hashed % mmap.ALLOCATIONGRANULARITY
            n = min(HASH_CHUNK, upto - hashed)
            with mmap.mmap(self.fd, hashed + n - base, access=mmap.ACCESS_READ,
                           offset=base) as mapped, memoryview(mapped) as view:
                hasher.update(view[hashed - base :])
            start_writeback(self.fd, hashed, n)
            hashed += n
        return hashed


def main(argv: list[str]) -> int:
    # Ctrl-C at a terminal reaches the whole process group; the daemon stops its children
    # itself (it closes their stdin), after recording where each download stands.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m actors.pump_main FD", file=sys.stderr)
        return 2
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, NICENESS)  # this thread; the others inherit it
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    server = Server(int(argv[0]), FrameWriter(os.fdopen(protocol_fd, "wb", buffering=0)))
    try:
        server.serve()
    except (FrameError, ValueError, KeyError, TypeError) as exc:
        print(f"modeld pump: protocol error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stderr.flush()
    # Pumps may still be blocked in recv: the kernel closes their sockets; no teardown.
    os._exit(code)
