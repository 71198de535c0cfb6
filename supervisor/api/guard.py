"""Who may talk to modeld, checked in one place for HTTP and WebSocket alike.

- Host must be a loopback name (or listed in allowed_hosts): the DNS-rebinding defence. An
  absolute-form request target (`GET http://evil.example/ HTTP/1.1`) is held to the same list.
- A request with an Origin is refused unless that origin is allowed (`Origin: null` never is); so
  is `Sec-Fetch-Site: cross-site` without an allowed Origin: a web page the user opens cannot
  drive the daemon, neither by fetch, a form post, nor a WebSocket.
- With a token file, every request needs `Authorization: Bearer <token>` (WebSockets may pass
  it as a `bearer.<token>` subprotocol or a `token` query parameter, since browsers cannot set
  headers on them). Only the token's SHA-256 is kept, and candidates are compared digest to
  digest in constant time, so neither the token's value nor its length leaks through timing.
- A mutating request carries its body as the one media type its route reads (`accepts`), so a
  cross-site "simple" request (text/plain, form-encoded) never reaches a handler.

Nothing here logs or keeps a header value: the reprs of `Incoming` and `Secret` are redacted,
because exception reports may print the locals of the frames they pass through.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from typing import TypeVar
from urllib.parse import urlsplit

import attrs

from actors.errors import InvalidInput, ModelError
from actors.spec import is_valid_id

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
BEARER_SUBPROTOCOL = "bearer."

_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,251}[a-z0-9_])?")
_IPV6 = re.compile(r"\[[0-9a-f:.]{2,45}\]")
_PORT = re.compile(r"[0-9]{0,5}")


class Refused(ModelError):
    code = "forbidden"


class Unauthorized(ModelError):
    code = "unauthorized"


class UnsupportedMediaType(ModelError):
    code = "unsupported_media_type"


class PayloadTooLarge(ModelError):
    code = "payload_too_large"


def check_model_id(model: str) -> str:
    """`model` when it is a well-formed id (safe as a file name); InvalidInput (400) otherwise."""
    if not is_valid_id(model):
        raise InvalidInput(
            "malformed model id: use 1-128 characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit",
            code="invalid_id",
        )
    return model


def host_name(host: str) -> str | None:
    """The name part of a Host header value (or URL authority), lower-cased, port dropped;
    IPv6 literals keep their brackets. None when it is not a well-formed host[:port]."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        name, rest = host[: end + 1], host[end + 1 :]
        if end < 0 or not _IPV6.fullmatch(name):
            return None
    else:
        name, sep, port = host.partition(":")
        rest = sep + port
        if not _NAME.fullmatch(name):
            return None
    if rest and not (rest.startswith(":") and _PORT.fullmatch(rest[1:])):
        return None
    return name


def same_origin(origin: str, host: str | None) -> bool:
    """Whether a browser's Origin is the daemon itself as the request names it (its status
    page calling its API). The Host was checked first, so a rebinding page (whose Host is its
    own name) is never same-origin."""
    if host is None:
        return False
    parts = urlsplit(normal_origin(origin))
    return parts.scheme in ("http", "https") and parts.netloc == host.strip().lower() and not (
        parts.path or parts.query or parts.fragment)


def normal_origin(origin: str) -> str:
    """An Origin (or allowed_origins entry) compared case-insensitively, without a final slash."""
    return origin.strip().rstrip("/").lower()


class Secret:
    """A token that can be checked but not read back: only its SHA-256 is kept."""

    __slots__ = ("_digest",)

    def __init__(self, value: str) -> None:
        self._digest = hashlib.sha256(value.encode("utf-8")).digest()

    def matches(self, candidate: str) -> bool:
        """Constant-time: the time taken depends on neither the token nor the candidate."""
        offered = hashlib.sha256(candidate.encode("utf-8", "surrogatepass")).digest()
        return hmac.compare_digest(offered, self._digest)

    def __repr__(self) -> str:
        return "Secret([redacted])"


@attrs.frozen(repr=False)
class Incoming:
    """What the guard looks at in one request or WebSocket handshake.

    `headers` keeps every header line, names lower-cased; `target` is the raw request target
    (it carries an authority only in absolute form); `query_token` and `subprotocols` are the
    WebSocket-only places a token may travel.
    """

    method: str
    headers: tuple[tuple[str, str], ...]
    target: str = "/"
    query_token: str | None = None
    subprotocols: tuple[str, ...] = ()

    @classmethod
    def create(
        cls,
        method: str,
        headers: Iterable[tuple[str, str]],
        *,
        target: str = "/",
        query_token: str | None = None,
        subprotocols: Iterable[str] = (),
    ) -> Incoming:
        return cls(
            method.upper(),
            tuple((name.lower(), value) for name, value in headers),
            target,
            query_token,
            tuple(subprotocols),
        )

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def first(self, name: str) -> str | None:
        found = self.values(name)
        return found[0] if found else None

    def has_body(self) -> bool:
        length = self.first("content-length")
        return bool(self.values("transfer-encoding")) or (
            length is not None and length.strip() not in ("", "0")
        )

    def __repr__(self) -> str:
        names = sorted({name for name, _ in self.headers})
        return f"Incoming({self.method}, headers={names}, [values redacted])"


@attrs.frozen
class Guard:
    allowed_hosts: frozenset[str]
    allowed_origins: frozenset[str]
    token: Secret | None = None

    @classmethod
    def create(
        cls, allowed_hosts: Iterable[str], allowed_origins: Iterable[str], token: str | None
    ) -> Guard:
        extra = {host_name(h) for h in allowed_hosts}
        hosts = LOOPBACK_HOSTS | {h for h in extra if h is not None}
        origins = frozenset(normal_origin(o) for o in allowed_origins) - {"null"}
        return cls(frozenset(hosts), origins, Secret(token) if token else None)

    def check(self, incoming: Incoming, *, token: bool = True) -> None:
        """Raise Refused (403) or Unauthorized (401) when the request may not proceed.

        The order matters: a rebinding page learns nothing about the token, and a page on a
        foreign origin is refused whatever credentials its browser adds. `token=False` (the
        routes marked `without_token`) skips only the token.
        """
        self.check_host(incoming)
        self.check_origin(incoming)
        if is_preflight(incoming):
            return  # from an allowed origin (checked above): browsers never send a token here
        if token:
            self.check_token(incoming)

    def check_host(self, incoming: Incoming) -> None:
        hosts = incoming.values("host")
        if not self._host_allowed(hosts):
            raise Refused(
                "this Host is not allowed; use localhost or 127.0.0.1, or add the name "
                "to [server] allowed_hosts",
                code="host_not_allowed",
            )
        if not incoming.target.startswith("/") and incoming.target != "*":
            authority = urlsplit(incoming.target).netloc
            if host_name(authority) not in self.allowed_hosts:
                raise Refused("the request target names a host that is not allowed",
                              code="host_not_allowed")

    def _host_allowed(self, hosts: list[str]) -> bool:
        if len(hosts) != 1:  # none, or two that could disagree: refuse both
            return False
        return host_name(hosts[0]) in self.allowed_hosts

    def check_origin(self, incoming: Incoming) -> None:
        origins = incoming.values("origin")
        if origins:
            if len(set(origins)) != 1 or not (
                    self.origin_allowed(origins[0])
                    or same_origin(origins[0], incoming.first("host"))):
                raise Refused(
                    "cross-origin requests are refused; add the origin to [server] "
                    "allowed_origins to allow it",
                    code="origin_not_allowed",
                )
            return
        site = (incoming.first("sec-fetch-site") or "").strip().lower()
        if site == "cross-site":
            raise Refused("cross-site requests are refused", code="origin_not_allowed")

    def origin_allowed(self, origin: str) -> bool:
        return normal_origin(origin) in self.allowed_origins

    def check_token(self, incoming: Incoming) -> None:
        if self.token is None:
            return
        if not any(self.token.matches(c) for c in _offered_tokens(incoming)):
            raise Unauthorized(
                "a valid 'Authorization: Bearer <token>' header is required; the token is "
                "in the file named by [server] token_file"
            )


def is_preflight(incoming: Incoming) -> bool:
    """A CORS preflight: OPTIONS with an Origin and Access-Control-Request-Method. A browser
    sends it without credentials; it reaches no handler (Quart answers OPTIONS itself), so it
    needs no token once its Origin passed."""
    return (incoming.method == "OPTIONS" and incoming.first("origin") is not None
            and incoming.first("access-control-request-method") is not None)


def _offered_tokens(incoming: Incoming) -> list[str]:
    offered = []
    for auth in incoming.values("authorization"):
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            offered.append(value.strip())
    if incoming.query_token:
        offered.append(incoming.query_token)
    for proto in incoming.subprotocols:
        if proto.startswith(BEARER_SUBPROTOCOL) and len(proto) > len(BEARER_SUBPROTOCOL):
            offered.append(proto[len(BEARER_SUBPROTOCOL) :])
    return offered


def bearer_subprotocol(offered: Iterable[str]) -> str | None:
    """The subprotocol to echo when accepting a WebSocket: the `bearer.<token>` one that
    carried the token (browsers drop a connection whose offered subprotocols get no answer)."""
    for proto in offered:
        if proto.startswith(BEARER_SUBPROTOCOL):
            return proto
    return None


def media_type(content_type: str | None) -> str | None:
    """The media type of a Content-Type value, lower-cased, parameters dropped."""
    if content_type is None:
        return None
    return content_type.split(";", 1)[0].strip().lower()


def is_json_media_type(content_type: str | None) -> bool:
    """Exactly application/json; the only parameter accepted is charset=utf-8."""
    if media_type(content_type) != JSON:
        return False
    assert content_type is not None
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if (name.strip().lower(), value.strip().strip('"').lower()) not in (
            ("charset", "utf-8"),
            ("", ""),
        ):
            return False
    return True


def check_media_type(incoming: Incoming, expected: str) -> None:
    """A mutating request's Content-Type, when it has one or carries a body, must be `expected`.

    Raise UnsupportedMediaType (415) otherwise. Refusing a wrong Content-Type even on an empty
    body keeps cross-site form posts (`application/x-www-form-urlencoded`, `text/plain`,
    `multipart/form-data`) away from every handler.
    """
    if incoming.method not in MUTATING_METHODS:
        return
    content_type = incoming.first("content-type")
    if content_type is None and not incoming.has_body():
        return
    ok = (
        is_json_media_type(content_type)
        if expected == JSON
        else media_type(content_type) == expected
    )
    if not ok:
        raise UnsupportedMediaType(f"send the body as Content-Type: {expected}")


View = TypeVar("View", bound=Callable[..., object])


def accepts(expected: str) -> Callable[[View], View]:
    """Mark a route whose body is not JSON (e.g. the file upload: application/octet-stream)."""

    def mark(view: View) -> View:
        view.modeld_media_type = expected  # type: ignore[attr-defined]
        return view

    return mark


def without_token(view: View) -> View:
    """Mark a route that answers without the token (GET /health: it reveals nothing else, and
    load balancers and service scripts probe it without credentials). Host and Origin still
    apply."""
    view.modeld_without_token = True  # type: ignore[attr-defined]
    return view


def needs_token(view: object) -> bool:
    return not getattr(view, "modeld_without_token", False)


def body_media_type(view: object) -> str:
    """The media type a view function reads its body as: JSON unless marked by `accepts`."""
    return str(getattr(view, "modeld_media_type", JSON))
