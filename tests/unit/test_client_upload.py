"""The CLI's upload against a peer that stops reading (a daemon that answered early, or hung):
it fails within its stall timeout instead of waiting forever. A real loopback socket."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

from supervisor.client import Api, ApiError, ClientError, Endpoint


def test_a_stalled_upload_fails_in_time(tmp_path: Path) -> None:
    path = tmp_path / "big.gguf"
    path.write_bytes(bytes(64 * 1024 * 1024))  # more than loopback's socket buffers hold
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        accepted: list[socket.socket] = []
        threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
        errors: list[Exception] = []

        def upload() -> None:
            with Api(Endpoint(f"http://127.0.0.1:{port}")) as api:
                try:
                    api.upload("m", path, stall=1.0)
                except ClientError as exc:
                    errors.append(exc)

        started = time.monotonic()
        thread = threading.Thread(target=upload, daemon=True)
        thread.start()
        thread.join(20)
        try:
            assert not thread.is_alive(), "the upload hangs"
            assert time.monotonic() - started < 15
            with pytest.raises(ClientError, match="stopped taking the upload"):
                raise errors[0]
        finally:
            for conn in accepted:
                conn.close()


def _serve_once(server: socket.socket, answer: bytes, read_all: bool) -> threading.Thread:
    """Accept one connection, read its head (and the whole body when `read_all`), answer,
    close."""

    def run() -> None:
        try:
            conn, _ = server.accept()
        except OSError:  # the test ended without connecting
            return
        with conn, contextlib.suppress(OSError):  # the client may leave first
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while read_all and len(body) < length:
                more = conn.recv(1 << 20)
                if not more:
                    break
                body += more
            conn.sendall(answer)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_file_that_shrinks_while_it_is_sent_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shrinking.gguf"
    path.write_bytes(bytes(16 * 1024 * 1024))
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = _serve_once(server, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
                           read_all=True)
        port = server.getsockname()[1]

        def shrink(_n: int) -> None:
            with path.open("r+b") as f:
                f.truncate(1024 * 1024)

        with Api(Endpoint(f"http://127.0.0.1:{port}")) as api, \
                pytest.raises(ClientError, match="changed while it was uploaded"):
            api.upload("m", path, on_chunk=shrink)
        peer.join(10)


def test_an_early_refusal_is_read_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "refused.gguf"
    path.write_bytes(bytes(1024 * 1024))  # fits the socket buffers: the send completes
    body = b'{"error": "invalid_input", "message": "not a GGUF file"}'
    answer = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
              b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
              + body)
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = _serve_once(server, answer, read_all=False)
        port = server.getsockname()[1]
        with Api(Endpoint(f"http://127.0.0.1:{port}")) as api, \
                pytest.raises(ApiError, match="not a GGUF file") as refused:
            api.upload("m", path)
        peer.join(10)
    assert 400 == refused.value.status and "invalid_input" == refused.value.code
