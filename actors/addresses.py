"""Which network addresses a download may connect to, for the daemon's probe
(actors/download/origin.py) and the pump child that fetches the bytes (actors/pump_body.py): both
apply this one rule to the addresses a host name resolves to, and to the address connected to.

- A link-local address (169.254.0.0/16, fe80::/10: cloud metadata services, the local link's
  own devices) is never connected to.
- A private or loopback address (10/8, 172.16/12, 192.168/16, 127/8, ::1, fc00::/7, ...) is
  connected to only when the user's own URL names it, when the origin the URL names is itself
  private (a mirror on the local network), or with `[download] allow_private`: never when a
  public origin's redirect leads there (`private_ok` False).

Standard library only: the pump child starts in a few tens of milliseconds.
"""

from __future__ import annotations

import ipaddress
import socket

LINK_LOCAL = "link-local"
PRIVATE = "private"
PUBLIC = "public"


class Blocked(Exception):
    """No address of the host may be connected to; nothing was connected. `reason` names the
    host and why, never anything an answer from it said."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def kind(address: str) -> str:
    """LINK_LOCAL, PRIVATE (anything not globally routable: loopback, private ranges, CGNAT,
    unspecified) or PUBLIC. An IPv4 address mapped into IPv6 counts as itself."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_link_local:
        return LINK_LOCAL
    return PUBLIC if ip.is_global else PRIVATE


def refusal(address: str, *, private_ok: bool) -> str | None:
    """Why `address` may not be connected to (None: it may)."""
    found = kind(address)
    if found == LINK_LOCAL:
        return ("a link-local address (169.254.0.0/16 or fe80::/10, where cloud metadata "
                "services answer), which modeld never downloads from")
    if found == PRIVATE and not private_ok:
        return ("a private or loopback address, reached by a redirect from a public origin; "
                "set [download] allow_private to allow it")
    return None


def first_refusal(host: str, addresses: list[str], *, private_ok: bool) -> str | None:
    """Why `host`, resolved to `addresses`, may not be connected to: any refused address
    refuses the host (which one a connection would take is not ours to choose)."""
    for address in addresses:
        why = refusal(address, private_ok=private_ok)
        if why is not None:
            shown = host if host == address else f"{host} ({address})"
            return f"{shown} is {why}"
    return None


def connect(host: str, port: int, timeout: float, *, private_ok: bool) -> socket.socket:
    """`socket.create_connection`, resolving `host` once and connecting only to addresses the
    rule allows, so the address checked is the address connected to. Blocking. Raises Blocked
    (before any connection) when the rule refuses the host, OSError as create_connection."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    why = first_refusal(host, [str(info[4][0]) for info in infos], private_ok=private_ok)
    if why is not None:
        raise Blocked(why)
    last: OSError | None = None
    for family, kind_, proto, _name, where in infos:
        sock = socket.socket(family, kind_, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(where)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last or OSError(f"no address for {host}")
