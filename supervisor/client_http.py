"""HTTP for the `modeld` command, on the standard library's http.client: one request per
connection to the daemon, timeouts per phase, and uploads sent with sendfile(2) straight from
the page cache (no copy through this process). It imports in milliseconds, where httpx and
httpcore cost every command about a quarter of a second.

Errors are `TransportError`s saying which phase failed; supervisor/client.py words them for
the person at the terminal.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Callable
from typing import Any, BinaryIO, Literal
from urllib.parse import urlsplit

import attrs

Phase = Literal["connect", "send", "answer"]
# Bytes per sendfile call (a progress step) of an upload.
SEND_PIECE = 4 * 1024 * 1024


@attrs.frozen
class Timeout:
    """Seconds allowed to connect, to send (without progress) and to answer; None: no limit."""

    connect: float = 5.0
    send: float | None = 60.0
    answer: float | None = 60.0


@attrs.frozen
class Reply:
    status_code: int
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


class TransportError(Exception):
    """The daemon could not be reached, or the exchange broke off (`phase` says where)."""

    def __init__(self, phase: Phase, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.phase = phase
        self.timed_out = timed_out


class FileChanged(Exception):
    """The file being uploaded grew or shrank while it was sent."""


class Transport:
    """Requests to the daemon at `url` (http or https), with `headers` on each."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._headers = headers

    def _connect(self, timeout: Timeout) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection
        if self._https:
            import ssl  # only an https daemon needs the CA bundle (0.1 s to load)

            connection = http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout.connect,
                context=ssl.create_default_context())
        else:
            connection = http.client.HTTPConnection(self._host, self._port,
                                                    timeout=timeout.connect)
        try:
            connection.connect()
        except OSError as exc:
            connection.close()
            raise _broken("connect", exc) from None
        return connection

    def request(self, method: str, path: str, *, timeout: Timeout,
                body: Any = None) -> Reply:
        """One request; `body`, when given, is sent as JSON."""
        headers = {**self._headers, "accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        connection = self._connect(timeout)
        try:
            _set_timeout(connection, timeout.send)
            try:
                connection.request(method, self._prefix + path, body=data, headers=headers)
            except OSError as exc:
                raise _broken("send", exc) from None
            return _answer(connection, timeout)
        finally:
            connection.close()

    def put_file(self, path: str, file: BinaryIO, size: int, *, timeout: Timeout,
                 on_piece: Callable[[int], None] | None = None) -> Reply:
        """PUT exactly `size` bytes of `file` (from its start) with sendfile. Raises
        FileChanged when the file is not `size` bytes long before its last piece goes, so a
        file still being written never reaches the daemon whole."""
        connection = self._connect(timeout)
        try:
            _set_timeout(connection, timeout.send)
            try:
                connection.putrequest("PUT", self._prefix + path, skip_accept_encoding=True)
                for name, value in {**self._headers, "accept": "application/json",
                                    "content-type": "application/octet-stream",
                                    "content-length": str(size)}.items():
                    connection.putheader(name, value)
                connection.endheaders()
                _send_file(connection, file, size, on_piece)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon answered early (a refusal) and closed: read that answer
            except OSError as exc:
                raise _broken("send", exc) from None
            return _answer(connection, timeout)
        finally:
            connection.close()


def _send_file(connection: http.client.HTTPConnection, file: BinaryIO, size: int,
               on_piece: Callable[[int], None] | None) -> None:
    sock, fd = connection.sock, file.fileno()
    if size == 0:
        if os.fstat(fd).st_size != 0:
            raise FileChanged
        return
    sent = 0
    while sent < size:
        piece = min(SEND_PIECE, size - sent)
        if on_piece is not None:
            on_piece(piece)
        if sent + piece == size and os.fstat(fd).st_size != size:
            raise FileChanged  # before the last piece goes: the daemon gets no file
        if sock.sendfile(file, sent, piece) < piece:  # it loops until `piece` or the end
            raise FileChanged  # it shrank
        sent += piece


def _set_timeout(connection: http.client.HTTPConnection, seconds: float | None) -> None:
    if connection.sock is not None:
        connection.sock.settimeout(seconds)


def _broken(phase: Phase, exc: OSError) -> TransportError:
    return TransportError(phase, str(exc) or type(exc).__name__,
                          timed_out=isinstance(exc, TimeoutError))


def _answer(connection: http.client.HTTPConnection, timeout: Timeout) -> Reply:
    _set_timeout(connection, timeout.answer)
    try:
        response = connection.getresponse()
        return Reply(response.status, response.read())
    except OSError as exc:
        raise _broken("answer", exc) from None
    except http.client.HTTPException as exc:
        raise TransportError("answer", str(exc) or type(exc).__name__) from None
