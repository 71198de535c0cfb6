"""One GET of a model file's bytes in the pump child (actors/pump_main.py): connect, send the
request, judge the response head (actors/heads.py), and move the body into the partial file.

The body takes the shortest way the kernel allows. Over plain TCP with a known length it goes
socket -> pipe -> file with splice(2): the bytes never enter this process. Over TLS (which must
be decrypted here), or for a chunked or unsized body, it is read into a buffer and written.
Written bytes are handed to the disk every WRITEBACK_EVERY bytes (sync_file_range), so that the
fsync before publishing finds little left to write, whether or not a sha256 is checked.

Standard library plus h11 and certifi.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable

import certifi
import h11

from actors.addresses import Blocked, connect
from actors.frames import Frame
from actors.heads import Refused, header_fields, judge_body
from actors.writeback import WRITEBACK_EVERY, start_writeback

PUMP_BUFFER = 1024 * 1024  # bytes per read (TLS) or per splice
# MODELD_SPLICE=0 in the daemon's environment: bodies are received with recv_into and written
# with pwrite (for a file system whose splice misbehaves, and for fault injectors such as
# libfiu, which intercept write calls but not splice).
SPLICE = os.environ.get("MODELD_SPLICE", "1") != "0"
REPORT_EVERY = 0.05  # seconds between position frames of one pump
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """How downloads check origins' certificates: the CA bundle in $SSL_CERT_FILE when set
    (a local mirror, a company CA), else certifi's (as httpx); hostnames always checked."""
    return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or certifi.where())


class Stopped(Exception):
    pass


class Failed(Exception):
    """The pump ends without its bytes; `kind` as in the `end` frame."""

    def __init__(self, kind: str, reason: str, code: int = 0, *, status: int = 0,
                 retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.errno = kind, reason, code
        self.status, self.retry_after = status, retry_after


class BodyFetch:
    """[start, end) of the file (`end` None: to the end of the body) into `fd`, as asked by
    a `pump` frame; `moved(pos)` is called at most every REPORT_EVERY seconds."""

    def __init__(self, msg: Frame, fd: int, stop: threading.Event,
                 moved: Callable[[int], None]) -> None:
        self.msg, self.fd, self.stop, self.moved = msg, fd, stop, moved
        self.pos = int(msg["start"])
        self.end: int | None = None if msg.get("end") is None else int(msg["end"])
        # The most bytes the file may hold (its known size, plus one to see an origin that
        # sends more); without a known size, the free space the disk must keep (`min_free`).
        self.cap: int | None = None if msg.get("cap") is None else int(msg["cap"])
        self.min_free = int(msg.get("min_free") or 0)
        # Bytes before `start` asked for again and compared with the partial's (a resume's
        # fingerprint: the origin must still serve the same file, whatever its ETag says).
        self.overlap = int(msg.get("overlap") or 0)
        # Fewer than `min_rate` bytes a second over any `rate_window` seconds: the origin is
        # dripping (a byte inside every stall timeout would otherwise hold it forever).
        self.min_rate = float(msg.get("min_rate") or 0)
        self.rate_window = float(msg.get("rate_window") or 30.0)
        self.window_at, self.window_pos = time.monotonic(), self.pos
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()
        self.handed = self.pos  # bytes before this are handed to the disk
        self.handed_bytes = 0  # of this body (tests look)
        self.reported = time.monotonic()
        self.splices = 0  # bodies moved by splice(2) (tests look)

    def halt(self) -> None:
        """Stop within one read: the socket shut down under the thread.

        The close that follows is abortive (an RST, as when a process dies): a graceful FIN
        to an origin that is blocked on a full window would leave it waiting on zero-window
        probes for a second or so before it notices."""
        with self.lock:
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
                    # The plain socket call, under TLS too: it wakes a thread blocked in a read.
                    socket.socket.shutdown(self.sock, socket.SHUT_RD)

    def run(self) -> None:
        msg = self.msg
        host, port, timeout = str(msg["host"]), int(msg["port"]), float(msg["timeout"])
        try:
            raw = connect(host, port, timeout, private_ok=bool(msg.get("private_ok", True)))
        except Blocked as exc:
            raise Failed("refused", exc.reason) from None
        except OSError as exc:
            raise Failed("transient",
                         f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        sock: socket.socket = raw
        with self.lock:
            self.sock = raw
        try:
            self._check_stop()
            if msg["scheme"] == "https":
                sock = tls_context().wrap_socket(raw, server_hostname=host)  # takes raw's fd
                with self.lock:
                    self.sock = sock
                self._check_stop()
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(method="GET", target=str(msg["target"]), headers=[
                ("Host", str(msg["netloc"])), ("User-Agent", "modeld"),
                ("Accept-Encoding", "identity"),
                *((str(k), str(v)) for k, v in msg["headers"])])
            sock.sendall(conn.send(request) + conn.send(h11.EndOfMessage()))
            length = self._head(conn, sock)
            self._check_stop()
            if self.overlap:
                self._check_overlap(conn, sock)
                if length is not None:
                    length -= self.overlap
            if length is None:
                self._body_by_events(conn, sock)
            else:
                self._sized_body(conn, sock, length)
            if self.cap is not None and self.pos >= self.cap:
                raise Failed("size", f"the origin sent more than the file's known size of "
                             f"{self.cap - 1} bytes; stopped there")
            if self.end is not None and self.pos < self.end and not self.stop.is_set():
                raise Failed("transient", "the origin closed the connection early")
        except TimeoutError:
            raise Failed("transient", f"no data for {timeout:g} s") from None
        except (OSError, h11.ProtocolError) as exc:
            raise Failed("transient", f"{type(exc).__name__}: {exc}") from None
        finally:
            self._hand_over()
            sock.close()

    def _hand_over(self) -> None:
        """Start the disk writing what was written since the last hand-over."""
        if start_writeback(self.fd, self.handed, self.pos - self.handed):
            self.handed_bytes += self.pos - self.handed
        self.handed = self.pos

    def _check_free(self) -> None:
        """A file of unknown size stops while the disk still has `min_free` bytes free."""
        if not self.min_free:
            return
        st = os.fstatvfs(self.fd)
        free = st.f_bavail * st.f_frsize
        if free < self.min_free:
            raise Failed("full", f"stopped at {self.pos} bytes: the storage filesystem is "
                         f"down to {free} bytes free, and {self.min_free} are kept free "
                         "([storage] min_free)", errno.ENOSPC)

    def _check_overlap(self, conn: h11.Connection, sock: socket.socket) -> None:
        """The body's first `overlap` bytes are the partial's just before `pos`, or the file
        changed (`changed`: start over). The bytes after them are written as usual."""
        got = bytearray()
        rest = memoryview(b"")
        while len(got) < self.overlap:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                if not data:
                    raise Failed("transient", "the origin closed the connection early")
                conn.receive_data(data)
            elif isinstance(event, h11.Data):
                need = self.overlap - len(got)
                got += event.data[:need]
                rest = memoryview(event.data)[need:]
            else:
                raise Failed("transient", "the origin's answer ended early")
        try:
            held = os.pread(self.fd, self.overlap, self.pos - self.overlap)
        except OSError as exc:
            raise Failed("disk", exc.strerror or str(exc), exc.errno or 0) from None
        if bytes(got) != held:
            raise Failed("changed", f"the origin's bytes before byte {self.pos} are not the "
                         "partial's (the file changed under the same ETag)")
        limit = self._limit(self.end)
        if rest:
            self._write(rest if limit is None else rest[: limit - self.pos])

    def _check_rate(self, now: float) -> None:
        """Fail (`slow`) when a whole window brought fewer than `min_rate` bytes a second."""
        if not self.min_rate or now - self.window_at < self.rate_window:
            return
        moved = self.pos - self.window_pos
        if moved < self.min_rate * (now - self.window_at):
            raise Failed("slow", f"the origin sent {moved} bytes in {now - self.window_at:.0f} "
                         f"s, less than [download] min_rate ({self.min_rate:g} bytes/s)")
        self.window_at, self.window_pos = now, self.pos

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped()

    def _head(self, conn: h11.Connection, sock: socket.socket) -> int | None:
        """Read and judge the response head; the body's length (None: chunked or unsized)."""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                if not data:
                    raise Failed("transient", "the origin closed the connection before "
                                 "answering")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                break
            elif not isinstance(event, h11.InformationalResponse):
                raise Failed("transient", f"unexpected {type(event).__name__} from the origin")
        head = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
        msg = self.msg
        try:
            judge_body(event.status_code, head, start=self.pos - self.overlap,
                       total=msg.get("total"),
                       etag=msg.get("etag"), ranged=bool(msg.get("ranged")))
        except Refused as refusal:
            raise Failed(refusal.kind, refusal.reason, status=refusal.status,
                         retry_after=refusal.retry_after) from None
        fields = header_fields(head)
        lengths = fields.get("content-length", [])
        if "transfer-encoding" in fields or len(lengths) != 1 or not lengths[0].isdigit():
            return None
        return int(lengths[0])

    def _body_by_events(self, conn: h11.Connection, sock: socket.socket) -> None:
        """A chunked or unsized body, through h11, to its end (or `end`)."""
        limit = self._limit(self.end)
        while limit is None or self.pos < limit:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(PUMP_BUFFER))
            elif isinstance(event, h11.Data):
                data = memoryview(event.data)
                self._write(data if limit is None else data[: limit - self.pos])
            elif isinstance(event, h11.EndOfMessage):
                return
            self._check_stop()

    def _sized_body(self, conn: h11.Connection, sock: socket.socket, length: int) -> None:
        """A body of `length` bytes: what h11 already holds, then the socket directly."""
        limit = self._limit(self.pos + length if self.end is None
                            else min(self.end, self.pos + length))
        assert limit is not None
        while self.pos < limit:
            event = conn.next_event()
            if not isinstance(event, h11.Data):
                break
            self._write(memoryview(event.data)[: limit - self.pos])
        if self.end is None:
            self.end = limit
        if isinstance(sock, ssl.SSLSocket) or not SPLICE or not self._splice(sock, limit):
            self._receive(sock, limit)

    def _limit(self, end: int | None) -> int | None:
        """Where writing stops: `end`, and never past `cap`."""
        if self.cap is None:
            return end
        return self.cap if end is None else min(end, self.cap)

    def _receive(self, sock: socket.socket, limit: int) -> None:
        buffer = memoryview(bytearray(PUMP_BUFFER))
        while self.pos < limit and not self.stop.is_set():
            n = sock.recv_into(buffer[: min(PUMP_BUFFER, limit - self.pos)])
            if not n:
                return
            self._write(buffer[:n])  # kept even when told to stop

    def _splice(self, sock: socket.socket, limit: int) -> bool:
        """socket -> pipe -> file with splice(2) up to `limit`; False when the kernel cannot
        (then nothing was moved). A stop shuts the socket down: the splice sees its end."""
        try:
            pipe_r, pipe_w = os.pipe()
        except OSError:
            return False
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe_w, F_SETPIPE_SZ, PUMP_BUFFER)
            timeout = sock.gettimeout()
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            first = True
            while self.pos < limit and not self.stop.is_set():
                try:
                    n = os.splice(sock.fileno(), pipe_w, min(PUMP_BUFFER, limit - self.pos),
                                  flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
                except BlockingIOError:
                    if not poller.poll(None if timeout is None else timeout * 1000):
                        raise TimeoutError() from None
                    continue
                except OSError as exc:
                    if first and exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        return False
                    raise
                if first:
                    first = False
                    self.splices += 1
                if not n:
                    return True
                self._drain(pipe_r, n)
            return True
        finally:
            os.close(pipe_r)
            os.close(pipe_w)

    def _drain(self, pipe_r: int, n: int) -> None:
        """Move `n` bytes from the pipe into the file at `pos` (kept even when told to stop)."""
        try:
            while n:
                moved = os.splice(pipe_r, self.fd, n, offset_dst=self.pos,
                                  flags=os.SPLICE_F_MOVE)
                n -= moved
                self._advance(self.pos + moved)
        except OSError as exc:
            raise Failed("disk", exc.strerror or str(exc), exc.errno or 0) from None

    def _write(self, data: memoryview) -> None:
        try:
            while data:
                n = os.pwrite(self.fd, data, self.pos)
                data = data[n:]
                self._advance(self.pos + n)
        except OSError as exc:
            raise Failed("disk", exc.strerror or str(exc), exc.errno or 0) from None

    def _advance(self, pos: int) -> None:
        self.pos = pos
        if pos - self.handed >= WRITEBACK_EVERY:
            self._hand_over()
            self._check_free()
        now = time.monotonic()
        self._check_rate(now)
        if now - self.reported >= REPORT_EVERY:
            self.reported = now
            self.moved(pos)
