"""The CLI's upload against a peer that stops reading (a daemon that answered early, or hung):
it fails within its stall timeout instead of waiting forever. A real loopback socket."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from supervisor.client import Api, ClientError, Endpoint


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
