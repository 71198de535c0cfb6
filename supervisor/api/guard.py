"""Who may talk to modeld, checked in one place for HTTP and WebSocket alike.

- Host must be a loopback name (or listed in allowed_hosts): the DNS-rebinding defence.
- A request with an Origin is refused unless that origin is allowed; so is Sec-Fetch-Site
  cross-site: a web page the user opens cannot drive the daemon.
- With a token file, every request needs `Authorization: Bearer <token>` (WebSockets may pass
  it as a `bearer.<token>` subprotocol or a `token` query parameter), compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

import attrs

from actors.errors import ModelError

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})


class Refused(ModelError):
    code = "forbidden"


class Unauthorized(ModelError):
    code = "unauthorized"


class UnsupportedMediaType(ModelError):
    code = "unsupported_media_type"


def host_name(host: str) -> str:
    """`host` without its port, lower-cased; IPv6 literals keep their brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@attrs.frozen
class Guard:
    allowed_hosts: frozenset[str]
    allowed_origins: frozenset[str]
    token: str | None = None

    @classmethod
    def create(
        cls, allowed_hosts: list[str], allowed_origins: list[str], token: str | None
    ) -> Guard:
        hosts = LOOPBACK_HOSTS | {host_name(h) for h in allowed_hosts}
        origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)
        return cls(frozenset(hosts), origins, token or None)

    def check(
        self,
        headers: Mapping[str, str],
        *,
        query_token: str | None = None,
        subprotocols: list[str] | None = None,
    ) -> None:
        """Raise Refused or Unauthorized when the request may not proceed.

        `headers` has lower-case names (see `lower_headers`).
        """
        host = headers.get("host", "")
        if not host or host_name(host) not in self.allowed_hosts:
            raise Refused("this Host is not allowed; use localhost or add it to allowed_hosts",
                          code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and origin.rstrip("/").lower() not in self.allowed_origins:
            raise Refused("cross-origin requests are refused; add the origin to "
                          "allowed_origins to allow it", code="origin_not_allowed")
        if headers.get("sec-fetch-site", "").lower() == "cross-site" and origin is None:
            raise Refused("cross-site requests are refused", code="origin_not_allowed")
        if self.token is not None and not self._token_ok(headers, query_token, subprotocols):
            raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required")

    def _token_ok(
        self, headers: Mapping[str, str], query_token: str | None, subprotocols: list[str] | None
    ) -> bool:
        assert self.token is not None
        expected = self.token.encode()
        offered: list[str] = []
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            offered.append(auth[7:].strip())
        if query_token:
            offered.append(query_token)
        for proto in subprotocols or ():
            if proto.startswith("bearer."):
                offered.append(proto[len("bearer."):])
        ok = False
        for candidate in offered:
            ok |= hmac.compare_digest(candidate.encode(), expected)
        return ok


def lower_headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header names lower-cased; a repeated header keeps its first value."""
    result: dict[str, str] = {}
    for name, value in items:
        result.setdefault(name.lower(), value)
    return result


def is_json_media_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json"
