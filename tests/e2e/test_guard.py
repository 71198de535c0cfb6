"""The guard through a real daemon: raw HTTP (h11 over a socket, so nothing is normalised on
the way), httpx and trio-websocket. Exact statuses and error codes; nothing gets past a refusal,
the daemon stays up and never logs a crash or a token."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from tests.daemon import Daemon
from tests.e2e.conftest import DaemonFactory

CATALOG = [{"id": "cat-a", "name": "Catalog A", "url": "http://127.0.0.1:9/a.gguf"}]
JSON = {"content-type": "application/json"}
TOKEN = "t0ken-Zq8rW2xK9pL4mN7v"


def raw(daemon: Daemon, method: str, target: str | bytes,
        headers: list[tuple[str, str]] | None = None, body: bytes = b"",
        host: str | None = "localhost",
        version: bytes = b"1.1") -> tuple[int, dict[str, str], Any]:
    """One request over a fresh socket, sent byte for byte as given: (status, headers, body),
    the body decoded as JSON when it is."""
    target_b = target if isinstance(target, bytes) else target.encode()
    lines = [method.encode() + b" " + target_b + b" HTTP/" + version]
    if host is not None:
        lines.append(b"Host: " + host.encode())
    for name, value in headers or []:
        lines.append(f"{name}: {value}".encode())
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}".encode())
    lines.append(b"Connection: close")
    wire = b"\r\n".join(lines) + b"\r\n\r\n" + body
    conn = h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(wire)
        status, out_headers, data = 0, {}, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                out_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                data += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    try:
        return status, out_headers, json.loads(data) if data else None
    except ValueError:
        return status, out_headers, data


def error_of(reply: tuple[int, dict[str, str], Any]) -> tuple[int, str | None]:
    status, _, body = reply
    return status, body.get("error") if isinstance(body, dict) else None


def model_ids(daemon: Daemon) -> list[str]:
    return [m["id"] for m in httpx.get(f"{daemon.url}/models").json()["iterable"]]


def assert_healthy(daemon: Daemon, *, stop: bool = True) -> None:
    assert 200 == httpx.get(f"{daemon.url}/models").status_code
    assert [] == daemon.events("request_crashed")
    if stop:
        assert 0 == daemon.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon with the catalog for the tests that only send it requests (a daemon start
    costs a second of CPU); the last check is that it stops cleanly."""
    daemon = Daemon(tmp_path_factory.mktemp("shared"), CATALOG).start()
    try:
        yield daemon
        assert_healthy(daemon)
    finally:
        daemon.close()


# --- DNS rebinding ---------------------------------------------------------------------------


def test_foreign_host_refused_before_routing(shared: Daemon) -> None:
    daemon = shared
    evil = "evil.example"
    assert (403, "host_not_allowed") == error_of(raw(daemon, "GET", "/models", host=evil))
    assert (403, "host_not_allowed") == error_of(
        raw(daemon, "GET", "/models", host=f"{evil}:{daemon.port}"))
    # Before routing: an unknown path and a malformed id are refused as well, not 404/400.
    assert (403, "host_not_allowed") == error_of(raw(daemon, "GET", "/nowhere", host=evil))
    assert (403, "host_not_allowed") == error_of(raw(daemon, "GET", "/model/..", host=evil))
    before = model_ids(daemon)
    reply = raw(daemon, "POST", "/models/create", [("Content-Type", "application/json")],
                b'{"name": "rebound"}', host=evil)
    assert (403, "host_not_allowed") == error_of(reply)
    assert before == model_ids(daemon)
    # Empty, missing, names that merely contain a loopback name, absolute-form targets.
    assert (403, "host_not_allowed") == error_of(raw(daemon, "GET", "/models", host=""))
    for host in ("localhost.evil.example", "127.0.0.1.evil.example", "localhost:1:2",
                 "evil.example#@localhost", "::1"):
        assert (403, "host_not_allowed") == error_of(raw(daemon, "GET", "/models", host=host))
    assert (403, "host_not_allowed") == error_of(
        raw(daemon, "GET", "http://evil.example/models"))
    # The loopback names pass, with or without a port.
    for host in ("localhost", f"localhost:{daemon.port}", "127.0.0.1", "[::1]",
                 f"[::1]:{daemon.port}", "LocalHost"):
        assert 200 == raw(daemon, "GET", "/models", host=host)[0], host
    assert len(daemon.events("request_refused")) >= 9
    assert_healthy(daemon, stop=False)


def test_a_refused_request_with_a_body_never_strands_its_connection(
        shared: Daemon) -> None:
    """A refusal may come before the body is read. A client that then reused the connection
    used to wait forever now and then (about 1 in 300 tries): the refusal closes it instead."""
    daemon = shared
    with httpx.Client(base_url=daemon.url, timeout=5) as api:
        for attempt in range(300):
            refused = api.post("/models/create", headers={"host": "evil.example"},
                               json={"name": "x" * attempt})
            assert (403, "close") == (refused.status_code, refused.headers.get("connection"))
            assert 200 == api.get("/models").status_code, attempt
        # Answers without a body to skip keep their connection.
        assert "connection" not in api.get("/models", headers={"host": "evil.example"}).headers
    assert_healthy(daemon, stop=False)


def test_host_without_http11_host_header_refused(shared: Daemon) -> None:
    daemon = shared
    reply = raw(daemon, "GET", "/models", host=None, version=b"1.0")
    assert (403, "host_not_allowed") == error_of(reply)
    assert_healthy(daemon, stop=False)


def test_allowed_hosts_configured(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(server={"allowed_hosts": ["models.lan", "Box.Example:8080"]}).start()
    assert 200 == raw(daemon, "GET", "/models", host=f"models.lan:{daemon.port}")[0]
    assert 200 == raw(daemon, "GET", "/models", host="box.example")[0]
    assert 200 == raw(daemon, "GET", "/models", host="localhost")[0]
    assert (403, "host_not_allowed") == error_of(
        raw(daemon, "GET", "/models", host="other.lan"))
    assert_healthy(daemon)


# --- cross-origin pages ----------------------------------------------------------------------


def test_foreign_origin_refused(shared: Daemon) -> None:
    daemon = shared
    base = daemon.url
    evil = {"Origin": "http://evil.example"}
    before = model_ids(daemon)
    r = httpx.get(f"{base}/models", headers=evil)
    assert (403, "origin_not_allowed") == (r.status_code, r.json()["error"])
    assert "access-control-allow-origin" not in r.headers
    r = httpx.post(f"{base}/models/create", json={"name": "csrf"}, headers=evil)
    assert (403, "origin_not_allowed") == (r.status_code, r.json()["error"])
    r = httpx.post(f"{base}/model/cat-a/download", headers=evil)
    assert (403, "origin_not_allowed") == (r.status_code, r.json()["error"])
    r = httpx.post(f"{base}/models/unload", headers=evil)
    assert (403, "origin_not_allowed") == (r.status_code, r.json()["error"])
    # A CORS preflight gets no permission either.
    r = httpx.options(f"{base}/models/create", headers={
        **evil, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert 403 == r.status_code
    assert not [h for h in r.headers if h.startswith("access-control-")]
    # Opaque origins (sandboxed frames, file: pages) send "null".
    r = httpx.post(f"{base}/models/create", json={"name": "csrf"}, headers={"Origin": "null"})
    assert (403, "origin_not_allowed") == (r.status_code, r.json()["error"])
    # Fetch metadata from a browser that leaves Origin off a cross-site GET.
    r = httpx.get(f"{base}/models", headers={"Sec-Fetch-Site": "cross-site"})
    assert (403, "origin_not_allowed") == (r.status_code, r.json()["error"])
    r = httpx.get(f"{base}/models", headers={"Sec-Fetch-Site": "same-origin"})
    assert 200 == r.status_code
    assert before == model_ids(daemon)
    assert "downloading" not in {m["state"] for m in httpx.get(f"{base}/models").json()[
        "iterable"]}
    assert_healthy(daemon, stop=False)


def test_allowed_origin_passes_with_cors_headers(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(server={"allowed_origins": ["http://localhost:3000"]}).start()
    base = daemon.url
    ok = {"Origin": "http://localhost:3000"}
    r = httpx.get(f"{base}/models", headers=ok)
    assert 200 == r.status_code
    assert "http://localhost:3000" == r.headers["access-control-allow-origin"]
    r = httpx.options(f"{base}/models/create", headers={
        **ok, "Access-Control-Request-Method": "POST"})
    assert 200 == r.status_code
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.post(f"{base}/models/create", json={"name": "from the page"}, headers=ok)
    assert 200 == r.status_code
    r = httpx.get(f"{base}/models", headers={"Origin": "http://localhost:3001"})
    assert (403, "origin_not_allowed") == (r.status_code, r.json()["error"])
    assert_healthy(daemon)


async def test_websocket_from_foreign_origin_fails_its_handshake(
    shared: Daemon,
) -> None:
    daemon = shared
    url = daemon.url.replace("http://", "ws://") + "/model/cat-a/download/progress"
    for headers, code in [
        ([(b"Origin", b"http://evil.example")], "origin_not_allowed"),
        ([(b"Origin", b"null")], "origin_not_allowed"),
        ([(b"Sec-Fetch-Site", b"cross-site")], "origin_not_allowed"),
    ]:
        with trio.fail_after(10):
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(url, extra_headers=headers) as ws:
                    await ws.get_message()  # never reached: nothing is streamed
        assert 403 == info.value.status_code
        assert info.value.body is not None
        assert code == json.loads(info.value.body)["error"]
    # A DNS-rebound page: wrong Host on the handshake.
    status, _, body = raw(daemon, "GET", "/model/cat-a/download/progress", [
        ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13"),
    ], host="evil.example")
    assert (403, "host_not_allowed") == (status, body["error"])
    # Without an Origin the same handshake works: snapshot, then a normal close.
    with trio.fail_after(10):
        async with open_websocket_url(url) as ws:
            first = json.loads(await ws.get_message())
            assert ("cat-a", "UNKNOWN") == (first["model"], first["status"])
            with pytest.raises(ConnectionClosed):
                await ws.get_message()
    assert 3 <= len(daemon.events("websocket_refused"))
    assert_healthy(daemon, stop=False)


# --- simple-request bodies -------------------------------------------------------------------


def test_non_json_bodies_refused_with_415(shared: Daemon) -> None:
    daemon = shared
    base = daemon.url
    before = model_ids(daemon)
    body = b'{"name": "smuggled"}'
    for content_type in ("text/plain", "text/plain;charset=UTF-8",
                         "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/json-patch+json", "text/json"):
        r = httpx.post(f"{base}/models/create", content=body,
                       headers={"content-type": content_type})
        assert (415, "unsupported_media_type") == (r.status_code, r.json()["error"]), (
            content_type)
    r = httpx.post(f"{base}/models/create", data={"name": "form"})
    assert (415, "unsupported_media_type") == (r.status_code, r.json()["error"])
    # No Content-Type at all on a body.
    assert (415, "unsupported_media_type") == error_of(
        raw(daemon, "POST", "/models/create", body=body))
    # Body-less commands refuse a form post too (an empty cross-site form is still a form).
    r = httpx.post(f"{base}/models/unload",
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert (415, "unsupported_media_type") == (r.status_code, r.json()["error"])
    r = httpx.post(f"{base}/model/cat-a/download", content=b"x=1",
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert (415, "unsupported_media_type") == (r.status_code, r.json()["error"])
    # The upload takes octet-stream only.
    r = httpx.put(f"{base}/model/cat-a/file", content=b"GGUF",
                  headers={"content-type": "text/plain"})
    assert (415, "unsupported_media_type") == (r.status_code, r.json()["error"])
    assert before == model_ids(daemon)
    assert [] == list((daemon.storage / "custom").glob("*")) if (
        daemon.storage / "custom").exists() else True
    assert "absent" == httpx.get(f"{base}/model/cat-a").json()["state"]
    # application/json (with charset=utf-8) is what works.
    r = httpx.post(f"{base}/models/create", content=body,
                   headers={"content-type": "application/json; charset=utf-8"})
    assert 200 == r.status_code
    assert_healthy(daemon, stop=False)


# --- token -----------------------------------------------------------------------------------


async def test_token_required_everywhere(make_daemon: DaemonFactory, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    page = "http://localhost:3000"
    daemon = make_daemon(CATALOG, server={"token_file": str(token_file),
                                          "allowed_origins": [page]}).start()
    base = daemon.url
    good = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=base) as client:
        # A browser's preflight never carries the token: an allowed page's is answered
        r = await client.options("/models/create", headers={
            "Origin": page, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert 200 == r.status_code, r.text
        assert page == r.headers["access-control-allow-origin"]
        assert "Authorization" in r.headers["access-control-allow-headers"]
        # ...and the request itself still needs it
        r = await client.post("/models/create", json={"name": "no"}, headers={"Origin": page})
        assert (401, "unauthorized") == (r.status_code, r.json()["error"])
        r = await client.get("/models", headers={"Origin": page, **good})
        assert (200, page) == (r.status_code, r.headers["access-control-allow-origin"])
        r = await client.options("/models/create", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert (403, "origin_not_allowed") == (r.status_code, r.json()["error"])
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN[:-1]}"}):
            r = await client.get("/models", headers=headers)
            assert (401, "unauthorized") == (r.status_code, r.json()["error"])
            assert TOKEN not in r.text
        # The token travels in a header, not the URL, for plain HTTP.
        assert 401 == (await client.get("/models", params={"token": TOKEN})).status_code
        assert 401 == (await client.post("/models/create", json={"name": "no"})).status_code
        # Refused before routing: no map of the API for strangers.
        assert 401 == (await client.get("/nowhere")).status_code
        r = await client.get("/models", headers=good)
        assert (200, ["cat-a"]) == (r.status_code, [m["id"] for m in r.json()["iterable"]])
        assert 200 == (await client.get("/openapi.json", headers=good)).status_code
    # Host is still checked first, whatever the token.
    assert (403, "host_not_allowed") == error_of(raw(
        daemon, "GET", "/models", [("Authorization", f"Bearer {TOKEN}")], host="evil.example"))

    url = daemon.url.replace("http://", "ws://") + "/model/cat-a/download/progress"
    with trio.fail_after(10):
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(url):
                pass
        assert 401 == info.value.status_code
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(url, subprotocols=["bearer.wrong"]):
                pass
        assert 401 == info.value.status_code
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(url + "?token=wrong"):
                pass
        assert 401 == info.value.status_code
        async with open_websocket_url(url, subprotocols=[f"bearer.{TOKEN}"]) as ws:
            assert f"bearer.{TOKEN}" == ws.subprotocol
            assert "UNKNOWN" == json.loads(await ws.get_message())["status"]
        async with open_websocket_url(url + f"?token={TOKEN}") as ws:
            assert "UNKNOWN" == json.loads(await ws.get_message())["status"]
        async with open_websocket_url(
            url, extra_headers=[(b"Authorization", f"Bearer {TOKEN}".encode())]
        ) as ws:
            assert "UNKNOWN" == json.loads(await ws.get_message())["status"]

    assert daemon.events("request_refused")
    assert [] == daemon.events("request_crashed")
    assert 0 == daemon.stop()
    assert not [line for line in daemon.raw_lines if TOKEN in line]
    assert not [line for line in daemon.raw_lines if TOKEN[:-1] in line]


# --- ids and paths ---------------------------------------------------------------------------


def tree(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def test_path_traversal_never_reaches_the_file_system(shared: Daemon) -> None:
    daemon = shared
    root = daemon.tmp
    outside_before = {p for p in tree(root) if daemon.storage not in (root / p).parents}
    ids_before = model_ids(daemon)
    cases: list[tuple[str, str, int, str]] = [
        ("GET", "/model/..%2F..%2Fetc%2Fpasswd", 404, "not_found"),
        ("GET", "/model/..%2f..%2fetc%2fpasswd", 404, "not_found"),
        ("GET", "/model/%2e%2e", 400, "invalid_id"),
        ("GET", "/model/%2E%2E", 400, "invalid_id"),
        ("GET", "/model/..", 400, "invalid_id"),
        ("GET", "/model/.", 400, "invalid_id"),
        ("GET", "/model/a..b", 400, "invalid_id"),
        ("GET", "/model/..%5C..%5Cetc", 400, "invalid_id"),
        ("GET", "/model/%2e%2e/download/progress", 400, "invalid_id"),
        ("POST", "/model/%2e%2e/download", 400, "invalid_id"),
        ("POST", "/model/%2e%2e/load", 400, "invalid_id"),
        ("POST", "/models/%2e%2e/delete", 400, "invalid_id"),
        ("POST", "/models/..%2F..%2Fd0/delete", 404, "not_found"),
        ("PUT", "/model/%2e%2e/file", 400, "invalid_id"),
        ("PUT", "/model/..%2F..%2Fescape/file", 404, "not_found"),
        ("GET", "/model/a%00b", 400, "invalid_id"),
        ("GET", "/model/cat-a%00", 400, "invalid_id"),
        ("GET", "/model/%00", 400, "invalid_id"),
        ("GET", "/model/" + "a" * 129, 400, "invalid_id"),
        ("GET", "/model/" + "a" * 8000, 400, "invalid_id"),
        ("GET", "/model/%C3%A9t%C3%A9", 400, "invalid_id"),
        ("GET", "/model/%ff", 400, "invalid_id"),
        ("GET", "/model/-rf", 400, "invalid_id"),
        ("GET", "/model/~root", 400, "invalid_id"),
    ]
    for method, target, status, code in cases:
        headers = [("Content-Type", "application/octet-stream")] if method == "PUT" else []
        body = b"GGUF" + b"\x00" * 64 if method == "PUT" else b""
        assert (status, code) == error_of(raw(daemon, method, target, headers, body)), target
    # Dot segments are not resolved into another route either.
    assert (404, "not_found") == error_of(raw(daemon, "GET", "/model/../models"))
    assert (404, "not_found") == error_of(raw(daemon, "GET", "/model/cat-a/../../models"))
    # The catalog model is untouched and nothing appeared outside the storage directory.
    assert ids_before == model_ids(daemon)
    outside_after = {p for p in tree(root) if daemon.storage not in (root / p).parents}
    assert outside_before == outside_after
    assert not [p for p in tree(daemon.storage) if "escape" in str(p) or "passwd" in str(p)]
    assert_healthy(daemon, stop=False)


# --- bodies ----------------------------------------------------------------------------------


def test_bodies_within_limits(shared: Daemon) -> None:
    daemon = shared
    base = daemon.url
    custom = httpx.post(f"{base}/models/create", json={"name": "victim"}).json()["id"]
    before = model_ids(daemon)
    deep_object = b'{"a":' * 100 + b"1" + b"}" * 100
    cases: list[tuple[str, bytes, int, str]] = [
        ("/models/create", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_body"),
        ("/models/create", b'{"name": "x", "capabilities": ' + deep_object + b"}", 400,
         "invalid_body"),
        ("/models/create", b'{"name": "\xff\xfe"}', 400, "invalid_body"),
        ("/models/create", b'{"name": "\xc0\xaf"}', 400, "invalid_body"),  # overlong "/"
        ("/models/create", b'{"name": "\xed\xa0\x80"}', 400, "invalid_body"),  # a surrogate
        ("/models/create", b'{"name": "\\ud800"}', 400, "invalid_body"),
        ("/models/create", b'{"\\udfff": 1}', 400, "invalid_body"),
        ("/models/create", b'{"name": "x", "parameters": NaN}', 400, "invalid_body"),
        ("/models/create", b'{"name": "x", "parameters": Infinity}', 400, "invalid_body"),
        ("/models/create", b'{"name": "x", "bytes": {"value": ' + b"9" * 5000 + b"}}", 400,
         "invalid_body"),
        ("/models/create", b'{"name": "x", "bytes": {"value": ' + b"9" * 40 + b"}}", 400,
         "invalid_body"),
        ("/models/create", b'{"name": "x", "ram": {"value": -1}}', 400, "invalid_body"),
        ("/models/create", b'{"name": "x", "url": "https://a.example/m.gguf\\n"}', 400,
         "invalid_body"),
        ("/models/create", b'{"name": "x", "url": "https://a.example:99999/m.gguf"}', 400,
         "invalid_body"),
        ("/models/create", b'{"name": "x", "url": "https://u:p@a.example/m.gguf"}', 400,
         "invalid_body"),
        ("/models/create", b'{"name": "x", "url": "file:///etc/passwd"}', 400,
         "invalid_body"),
        ("/models/create", b'"name"', 400, "invalid_body"),
        ("/models/create", b"", 400, "invalid_body"),
        ("/models/create", b'{"name": "x"} trailing', 400, "invalid_body"),
        ("/models/create", b'{"name": "' + b"x" * (2 * 1024 * 1024) + b'"}', 413,
         "payload_too_large"),
        ("/model/update", b'{"id": "' + custom.encode() + b'", "name": "'
         + b"x" * (2 * 1024 * 1024) + b'"}', 413, "payload_too_large"),
        ("/models/unload", b" " * (2 * 1024 * 1024), 413, "payload_too_large"),
        ("/model/cat-a/download", b"[" * 1000 + b"]" * 1000, 400, "invalid_body"),
    ]
    for path, body, status, code in cases:
        r = httpx.post(base + path, content=body, headers=JSON)
        assert (status, code) == (r.status_code, r.json()["error"]), (path, body[:60])
        assert "Traceback" not in r.text
    # A 2 MiB body sent chunked (no Content-Length) is cut off at 1 MiB as well.
    def chunks() -> Any:
        for _ in range(32):
            yield b" " * 65536
    r = httpx.post(f"{base}/models/create", content=chunks(), headers=JSON)
    assert (413, "payload_too_large") == (r.status_code, r.json()["error"])
    assert before == model_ids(daemon)
    assert "victim" == httpx.get(f"{base}/model/{custom}").json()["name"]
    assert_healthy(daemon, stop=False)


# --- the storage directory -------------------------------------------------------------------


def test_symlinks_in_storage_are_never_followed_out(make_daemon: DaemonFactory,
                                                    tmp_path: Path) -> None:
    """Links planted in the storage dir (after start) never let modeld read, replace or delete
    a file outside it."""
    daemon = make_daemon(CATALOG).start()
    base = daemon.url
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"GGUF" + b"\x00" * 100)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (daemon.storage / "models" / "cat-a.gguf").symlink_to(outside)
    custom = httpx.post(f"{base}/models/create", json={"name": "linked"}).json()["id"]
    link = daemon.storage / "models" / f"{custom}.gguf"
    link.symlink_to(victim)

    snap = httpx.get(f"{base}/model/cat-a").json()
    assert (False, "absent") == (snap["downloaded"], snap["state"])
    assert 409 == httpx.post(f"{base}/model/cat-a/load").status_code
    r = httpx.put(f"{base}/model/{custom}/file", content=b"GGUF" + b"\x00" * 64,
                  headers={"content-type": "application/octet-stream"})
    assert 400 <= r.status_code < 600 and r.status_code != 200
    httpx.post(f"{base}/models/cat-a/delete")
    httpx.post(f"{base}/models/{custom}/delete")

    assert b"GGUF" + b"\x00" * 100 == outside.read_bytes()
    assert "keep me" == victim.read_text()
    assert [] == daemon.events("request_crashed")
    assert 0 == daemon.stop()


def test_daemon_starts_with_a_link_out_of_storage(make_daemon: DaemonFactory,
                                                  tmp_path: Path) -> None:
    daemon = make_daemon(CATALOG)
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"GGUF" + b"\x00" * 100)
    (daemon.storage / "models").mkdir(parents=True)
    (daemon.storage / "models" / "cat-a.gguf").symlink_to(outside)
    daemon.start(timeout=10)
    snap = httpx.get(f"{daemon.url}/model/cat-a").json()
    assert (False, "absent") == (snap["downloaded"], snap["state"])
    assert 204 == httpx.post(f"{daemon.url}/models/cat-a/delete").status_code
    assert outside.exists()
    assert_healthy(daemon)
