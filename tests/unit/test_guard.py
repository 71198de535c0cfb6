"""The guard's pure parts: Host parsing, Origin, token comparison, media types."""

from __future__ import annotations

from typing import Any

import pytest

from actors.errors import InvalidInput
from supervisor.api.guard import (
    Guard,
    Incoming,
    Refused,
    Secret,
    Unauthorized,
    UnsupportedMediaType,
    bearer_subprotocol,
    check_media_type,
    check_model_id,
    host_name,
    is_json_media_type,
)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", "localhost"),
        ("localhost:1000", "localhost"),
        ("LOCALHOST:1000", "localhost"),
        ("localhost:", "localhost"),
        (" 127.0.0.1:8080 ", "127.0.0.1"),
        ("[::1]", "[::1]"),
        ("[::1]:1000", "[::1]"),
        ("models.lan", "models.lan"),
        ("evil.example:80", "evil.example"),
        ("", None),
        (":1000", None),
        ("::1", None),  # an IPv6 literal needs brackets
        ("[::1", None),
        ("[::1]x", None),
        ("[::1]:abc", None),
        ("localhost:abc", None),
        ("localhost:1000:1000", None),
        ("localhost:123456", None),
        ("user@localhost", None),
        ("localhost/evil", None),
        ("localhost\x00.evil.example", None),
        ("local host", None),
        ("-localhost", None),
        ("[evil.example]", None),
    ],
)
def test_host_name(host: str, expected: str | None) -> None:
    assert expected == host_name(host)


def incoming(headers: list[tuple[str, str]], method: str = "GET", **kw: Any) -> Incoming:
    return Incoming.create(method, headers, **kw)


def refused_code(guard: Guard, request: Incoming) -> str | None:
    try:
        guard.check(request)
    except (Refused, Unauthorized) as exc:
        return exc.code
    return None


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("localhost", True),
        ("127.0.0.1:1000", True),
        ("[::1]:1000", True),
        ("models.lan:1000", True),  # from allowed_hosts
        ("evil.example", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.nip.io", False),
        ("", False),
    ],
)
def test_host_allowlist(host: str, ok: bool) -> None:
    guard = Guard.create(["Models.LAN:9"], [], None)
    code = refused_code(guard, incoming([("Host", host)]))
    assert (None if ok else "host_not_allowed") == code


def test_missing_or_repeated_host_refused() -> None:
    guard = Guard.create([], [], None)
    assert "host_not_allowed" == refused_code(guard, incoming([]))
    both = incoming([("Host", "localhost"), ("Host", "evil.example")])
    assert "host_not_allowed" == refused_code(guard, both)


def test_absolute_form_target_is_held_to_the_allowlist() -> None:
    guard = Guard.create([], [], None)
    host = [("Host", "localhost")]
    assert "host_not_allowed" == refused_code(
        guard, incoming(host, target="http://evil.example/models"))
    assert None is refused_code(guard, incoming(host, target="http://localhost:1000/models"))
    assert None is refused_code(guard, incoming(host, target="/models"))


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ([], None),
        ([("Origin", "http://evil.example")], "origin_not_allowed"),
        ([("Origin", "null")], "origin_not_allowed"),
        ([("Origin", "http://localhost:3000")], None),
        ([("Origin", "HTTP://LOCALHOST:3000/")], None),
        ([("Origin", "http://localhost:3001")], "origin_not_allowed"),
        ([("Origin", "http://localhost:3000"), ("Origin", "http://evil.example")],
         "origin_not_allowed"),
        ([("Sec-Fetch-Site", "cross-site")], "origin_not_allowed"),
        ([("Sec-Fetch-Site", "Cross-Site")], "origin_not_allowed"),
        ([("Sec-Fetch-Site", "same-origin")], None),
        ([("Sec-Fetch-Site", "none")], None),
        ([("Sec-Fetch-Site", "cross-site"), ("Origin", "http://localhost:3000")], None),
    ],
)
def test_origin_and_fetch_metadata(headers: list[tuple[str, str]], code: str | None) -> None:
    guard = Guard.create([], ["http://localhost:3000", "null"], None)
    assert code == refused_code(guard, incoming([("Host", "localhost"), *headers]))


@pytest.mark.parametrize(
    ("host", "origin", "code"),
    [
        ("127.0.0.1:1000", "http://127.0.0.1:1000", None),  # the status page calling its API
        ("localhost:8080", "HTTP://LOCALHOST:8080/", None),
        ("127.0.0.1:1000", "https://127.0.0.1:1000", None),
        ("127.0.0.1:1000", "http://127.0.0.1:1001", "origin_not_allowed"),  # another local app
        ("127.0.0.1:1000", "http://localhost:1000", "origin_not_allowed"),
        ("127.0.0.1:1000", "ws://127.0.0.1:1000", "origin_not_allowed"),
        ("127.0.0.1:1000", "http://127.0.0.1:1000/x", "origin_not_allowed"),
        ("127.0.0.1:1000", "null", "origin_not_allowed"),
        # A rebinding page is same-origin with its own name, which the Host check refuses.
        ("evil.example:1000", "http://evil.example:1000", "host_not_allowed"),
    ],
)
def test_the_daemons_own_origin_is_allowed(host: str, origin: str, code: str | None) -> None:
    guard = Guard.create([], [], None)
    assert code == refused_code(guard, incoming([("Host", host), ("Origin", origin)]))


def test_secret_compares_and_never_shows_its_value() -> None:
    secret = Secret("s3cret-token")
    assert secret.matches("s3cret-token")
    for wrong in ("", "s3cret-toke", "s3cret-token ", "S3CRET-TOKEN", "s3cret-token\x00",
                  "x" * 10_000, "\ud800"):
        assert not secret.matches(wrong)
    assert "s3cret" not in repr(secret)
    guard = Guard.create([], [], "s3cret-token")
    assert "s3cret" not in repr(guard)


@pytest.mark.parametrize(
    ("headers", "kw", "ok"),
    [
        ([("Authorization", "Bearer tok-123")], {}, True),
        ([("Authorization", "bearer   tok-123  ")], {}, True),
        ([("Authorization", "Bearer tok-12")], {}, False),
        ([("Authorization", "Basic tok-123")], {}, False),
        ([("Authorization", "Bearer")], {}, False),
        ([("Authorization", "tok-123")], {}, False),
        ([], {}, False),
        ([], {"query_token": "tok-123"}, True),
        ([], {"query_token": "tok-124"}, False),
        ([], {"subprotocols": ["json", "bearer.tok-123"]}, True),
        ([], {"subprotocols": ["bearer.tok-12"]}, False),
        ([], {"subprotocols": ["tok-123"]}, False),
        ([("Authorization", "Bearer wrong")], {"query_token": "tok-123"}, True),
    ],
)
def test_token(headers: list[tuple[str, str]], kw: dict[str, Any], ok: bool) -> None:
    guard = Guard.create([], [], "tok-123")
    code = refused_code(guard, incoming([("Host", "localhost"), *headers], **kw))
    assert (None if ok else "unauthorized") == code


def test_no_token_configured_means_none_needed() -> None:
    guard = Guard.create([], [], None)
    assert None is refused_code(guard, incoming([("Host", "localhost")]))
    assert None is refused_code(guard, incoming([("Host", "localhost"),
                                                 ("Authorization", "Bearer anything")]))


def test_allowed_preflight_needs_no_token() -> None:
    guard = Guard.create([], ["http://localhost:3000"], "tok-123")
    page = [("Host", "localhost"), ("Origin", "http://localhost:3000")]
    asks = [("Access-Control-Request-Method", "POST")]
    assert None is refused_code(guard, incoming([*page, *asks], method="OPTIONS"))
    # Not a preflight: the token is needed
    assert "unauthorized" == refused_code(guard, incoming(page, method="OPTIONS"))
    assert "unauthorized" == refused_code(guard, incoming([*page, *asks], method="GET"))
    assert "unauthorized" == refused_code(guard, incoming(
        [("Host", "localhost"), *asks], method="OPTIONS"))
    # A foreign origin's preflight is refused as before
    assert "origin_not_allowed" == refused_code(guard, incoming(
        [("Host", "localhost"), ("Origin", "http://evil.example"), *asks], method="OPTIONS"))


def test_host_is_checked_before_the_token() -> None:
    guard = Guard.create([], [], "tok-123")
    assert "host_not_allowed" == refused_code(guard, incoming([("Host", "evil.example")]))


def test_incoming_repr_hides_header_values() -> None:
    request = incoming([("Host", "localhost"), ("Authorization", "Bearer tok-123")],
                       query_token="tok-123", subprotocols=["bearer.tok-123"])
    assert "tok-123" not in repr(request)


def test_bearer_subprotocol_is_echoed() -> None:
    assert "bearer.t" == bearer_subprotocol(["json", "bearer.t"])
    assert None is bearer_subprotocol(["json"])


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        ("application/json", True),
        ("Application/JSON", True),
        ("application/json; charset=utf-8", True),
        ("application/json;charset=\"UTF-8\"", True),
        ("application/json; charset=latin-1", False),
        ("application/json-patch+json", False),
        ("application/vnd.api+json", False),
        ("text/json", False),
        ("text/plain", False),
        ("", False),
        (None, False),
    ],
)
def test_json_media_type(content_type: str | None, ok: bool) -> None:
    assert ok == is_json_media_type(content_type)


@pytest.mark.parametrize(
    ("method", "headers", "expected", "ok"),
    [
        ("POST", [("Content-Type", "application/json"), ("Content-Length", "2")],
         "application/json", True),
        ("POST", [], "application/json", True),  # no body, no type: a bare command
        ("POST", [("Content-Length", "0")], "application/json", True),
        ("POST", [("Content-Type", "text/plain"), ("Content-Length", "2")],
         "application/json", False),
        ("POST", [("Content-Type", "text/plain")], "application/json", False),
        ("POST", [("Content-Type", "application/x-www-form-urlencoded"),
                  ("Content-Length", "0")], "application/json", False),
        ("POST", [("Content-Type", "multipart/form-data; boundary=x")],
         "application/json", False),
        ("POST", [("Content-Length", "2")], "application/json", False),
        ("POST", [("Transfer-Encoding", "chunked")], "application/json", False),
        ("PUT", [("Content-Type", "application/octet-stream"), ("Content-Length", "9")],
         "application/octet-stream", True),
        ("PUT", [("Content-Type", "application/json"), ("Content-Length", "9")],
         "application/octet-stream", False),
        ("GET", [("Content-Type", "text/plain")], "application/json", True),
    ],
)
def test_media_type_of_mutating_requests(
    method: str, headers: list[tuple[str, str]], expected: str, ok: bool
) -> None:
    request = incoming(headers, method=method)
    if ok:
        check_media_type(request, expected)
    else:
        with pytest.raises(UnsupportedMediaType):
            check_media_type(request, expected)


@pytest.mark.parametrize(
    "model_id", ["..", "a..b", "../etc", "a/b", "", "-a", ".a", "a" * 129, "a\x00", "é"]
)
def test_malformed_ids_refused(model_id: str) -> None:
    with pytest.raises(InvalidInput):
        check_model_id(model_id)


@pytest.mark.parametrize("model_id", ["a", "A.b_c-1", "a" * 128, "tinyllama-1.1b-chat-q4_k_m"])
def test_wellformed_ids_pass(model_id: str) -> None:
    assert model_id == check_model_id(model_id)
