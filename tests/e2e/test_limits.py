"""The daemon's limits, through one real daemon: a request head or body that stalls is dropped
after `[server] read_timeout`; connections beyond `[server] max_connections` wait their turn
(logged once) instead of exhausting the daemon's file descriptors; custom models stop at
`[storage] max_custom_models`."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.daemon import Daemon

READ_TIMEOUT = 1.0
LIMIT = 8  # the lowest limit modeld accepts
MAX_CUSTOM = 4


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    served = Daemon(tmp_path_factory.mktemp("slow") / "d",
                    server={"read_timeout": READ_TIMEOUT, "max_connections": LIMIT},
                    storage={"max_custom_models": MAX_CUSTOM})
    served.start()
    try:
        yield served
        assert 0 == served.stop()
    finally:
        served.close()


def connect(daemon: Daemon, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=15)
    sock.sendall(head)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the daemon sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize(("method", "path", "media"), [
    ("POST", "/models/create", "application/json"),
    ("PUT", "/model/any-model/file", "application/octet-stream"),
])
def test_a_stalled_body_is_answered_408_and_closed(daemon: Daemon, method: str, path: str,
                                                   media: str) -> None:
    if method == "PUT":
        r = httpx.post(f"{daemon.url}/models/create", json={"name": "any model"})
        path = f"/model/{r.json()['id']}/file"
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {media}\r\n"
            "Content-Length: 100000\r\n\r\n").encode()
    started = time.monotonic()
    with connect(daemon, head + b'{"na') as sock:
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer
    assert time.monotonic() - started < 10


def test_a_stalled_head_is_dropped(daemon: Daemon) -> None:
    started = time.monotonic()
    with connect(daemon, b"GET /models HTTP/1.1\r\nHo") as sock:
        read_all(sock)  # returns once the daemon closes it
    assert time.monotonic() - started < 10


def test_connections_beyond_the_limit_wait_and_are_logged_once(daemon: Daemon) -> None:
    stalled = [connect(daemon, b"GET /models HTTP/1.1\r\nHo") for _ in range(LIMIT + 4)]
    try:
        # A request waits for a slot (the stalled heads are dropped after READ_TIMEOUT)
        r = httpx.get(f"{daemon.url}/models", timeout=20)
        assert 200 == r.status_code
        event = daemon.wait_for("connection_limit_reached")
        assert LIMIT == event["limit"]
    finally:
        for sock in stalled:
            sock.close()
    assert 200 == httpx.get(f"{daemon.url}/models", timeout=20).status_code
    assert 1 == len(daemon.events("connection_limit_reached"))
    assert not [line for line in daemon.raw_lines if "Traceback" in line]


def test_custom_models_stop_at_the_limit(daemon: Daemon) -> None:
    def custom() -> list[str]:
        models = httpx.get(f"{daemon.url}/models").json()["iterable"]
        return [m["id"] for m in models if m["custom"]]

    for i in range(MAX_CUSTOM - len(custom())):
        assert 200 == httpx.post(f"{daemon.url}/models/create",
                                 json={"name": f"m{i}"}).status_code
    r = httpx.post(f"{daemon.url}/models/create", json={"name": "one too many"})
    assert (409, "too_many_models") == (r.status_code, r.json()["error"])
    assert "max_custom_models" in r.json()["message"]
    assert MAX_CUSTOM == len(custom())
    # Deleting one makes room
    assert 204 == httpx.post(f"{daemon.url}/models/{custom()[0]}/delete").status_code
    assert 200 == httpx.post(f"{daemon.url}/models/create", json={"name": "fits"}).status_code
