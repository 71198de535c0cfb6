"""Talking to the origin from the daemon: which URLs modeld fetches, the probe (one `Range:
bytes=0-0` GET, following redirects by hand) that learns the file's size, whether ranges are
served and its validators, and the retry rule. The file's bytes never come here: the pump child
fetches them (actors/pump.py)."""

from __future__ import annotations

import ipaddress
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import httpx
import trio

from actors.addresses import PUBLIC, first_refusal, kind
from actors.download.errors import (
    ContentChanged,
    DownloadError,
    OriginError,
    OriginUnreachable,
    TooManyRedirects,
    Transient,
    UrlRefused,
    describe,
)
from actors.heads import Refused, content_range, header_fields, judge_status

T = TypeVar("T")

MAX_REDIRECTS = 10
BACKOFF_BASE = 0.25
BACKOFF_CAP = 30.0
CONNECT_TIMEOUT = 10.0


# What a host name resolves to (its addresses as strings; [] when it does not resolve, which
# the connection attempt then reports).
Resolve = Callable[[str, int], Awaitable[list[str]]]


@attrs.frozen
class Probe:
    url: httpx.URL  # after redirects
    total: int | None
    ranges: bool
    etag: str | None
    last_modified: str | None
    # May the bytes' connections reach a private or loopback address (actors/addresses.py)?
    private_ok: bool = True
    # Reached by a redirect at an address that is not public: what it answers (statuses,
    # sizes, headers) is never repeated in an error.
    internal: bool = False
    # Whether the request's own headers still go to `url` (no redirect left the origin).
    credentialed: bool = False


INTERNAL = ("answered with an error; what it said is not shown, since a redirect led to an "
            "internal address")


async def resolve_host(host: str, port: int) -> list[str]:
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return [str(info[4][0]) for info in infos]


async def addresses_of(url: httpx.URL, resolve: Resolve) -> list[str]:
    """The addresses `url`'s host stands for: itself when it is one, else resolved."""
    try:
        return [str(ipaddress.ip_address(url.host))]
    except ValueError:
        return await resolve(url.host, port_of(url))


def port_of(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Exponential backoff with jitter: attempt 1 waits 0.5-1 x BACKOFF_BASE, doubling, capped."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(attempt - 1, 30)) * rng.uniform(0.5, 1.0)


def redact(url: httpx.URL | str) -> str:
    u = httpx.URL(url) if isinstance(url, str) else url
    return str(u.copy_with(username=None, password=None, query=None))


def same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    """The one rule for credentials: the same scheme, host and port."""
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def check_url(raw: str, *, allow_http: bool, previous: httpx.URL | None) -> httpx.URL:
    """The URL modeld may fetch, or UrlRefused."""
    what = "the download URL" if previous is None else "a redirect target"
    try:
        # A redirect's Location is resolved against the URL that sent it.
        url = httpx.URL(raw) if previous is None else previous.join(raw)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise UrlRefused(f"{what} is not a valid URL: {exc}") from None
    if url.scheme not in ("https", "http"):
        raise UrlRefused(f"{what} uses {url.scheme or 'no'} scheme; only https (or http) is used")
    if url.userinfo:
        raise UrlRefused(
            f"{what} ({redact(url)}) contains credentials (user:password@); remove them"
        )
    if not url.host:
        raise UrlRefused(f"{what} has no host")
    if url.scheme == "http" and previous is not None and previous.scheme == "https":
        raise UrlRefused(f"refusing a redirect from https to plain http ({redact(url)})")
    if url.scheme == "http" and not allow_http:
        raise UrlRefused(
            f"{what} ({redact(url)}) is plain http; use https or set [download] allow_http"
        )
    return url


def from_refusal(refusal: Refused, url: httpx.URL) -> DownloadError | ContentChanged | Transient:
    """A refused response head as the error that decides what happens next."""
    if refusal.kind == "changed":
        return ContentChanged(refusal.reason)
    if refusal.kind == "transient":
        return Transient(refusal.reason, retry_after=refusal.retry_after, status=refusal.status)
    return OriginError(f"{redact(url)} {refusal.reason}")


def open_client(stall_timeout: float, trust: ssl.SSLContext) -> httpx.AsyncClient:
    """The daemon's client for probes: no redirects (followed by hand), no proxies from the
    environment, identity bodies, `trust` as the pump's own connections (an SSLContext)."""
    return httpx.AsyncClient(
        follow_redirects=False, timeout=timeout(stall_timeout), trust_env=False,
        headers={"Accept-Encoding": "identity"}, verify=trust)


def timeout(stall_timeout: float) -> httpx.Timeout:
    return httpx.Timeout(connect=min(CONNECT_TIMEOUT, max(stall_timeout, 1.0)),
                         read=stall_timeout, write=stall_timeout, pool=None)


async def probe_once(client: httpx.AsyncClient, url: httpx.URL, *, allow_http: bool,
                     stall_timeout: float, allow_private: bool = False,
                     resolve: Resolve = resolve_host,
                     own_headers: tuple[tuple[str, str], ...] = ()) -> Probe:
    """One probe of the file at `url`, with `own_headers` while no redirect left its
    origin. Every hop's host is checked (actors/addresses.py) before it is connected to,
    and the address connected to after. Raises Transient (retry), DownloadError."""
    original = url
    extra = dict(own_headers)
    origin = await addresses_of(url, resolve)
    # A private origin (a mirror on the local network) may redirect to private addresses.
    private_origin = bool(origin) and all(kind(a) != PUBLIC for a in origin)
    try:
        for hop in range(MAX_REDIRECTS + 1):
            # The user's own URL may name a private host; a public origin's redirect may not.
            private_ok = allow_private or private_origin or hop == 0
            addresses = await addresses_of(url, resolve)
            _check_addresses(url, addresses, private_ok=private_ok, redirected=hop > 0)
            # Another server than the user's (another host or port), at an internal address.
            elsewhere = (url.host, port_of(url)) != (original.host, port_of(original))
            internal = elsewhere and any(kind(a) != PUBLIC for a in addresses)
            request = client.build_request(
                "GET", url,
                headers={**extra, "Accept-Encoding": "identity", "Range": "bytes=0-0"},
                timeout=timeout(stall_timeout))
            response = await client.send(request, stream=True, follow_redirects=False)
            try:  # the body is never read
                peer = _peer(response)
                if peer is not None:  # the address really connected to (a name may rebind)
                    _check_addresses(url, [peer], private_ok=private_ok, redirected=hop > 0)
                    internal = internal or (elsewhere and kind(peer) != PUBLIC)
                status, headers = response.status_code, response.headers
                if status in (301, 302, 303, 307, 308) and "location" in headers:
                    url = check_url(headers["location"], allow_http=allow_http, previous=url)
                    if not same_origin(url, original):
                        extra = {}  # dropped for good: never sent past another origin
                    continue
                try:
                    judge_status(status, header_fields(headers.multi_items()))
                except Refused as refused:
                    raise from_refusal(muted(refused) if internal else refused,
                                       original) from None
                return attrs.evolve(_probe_answer(url, status, headers), private_ok=private_ok,
                                    internal=internal,
                                    credentialed=bool(extra))
            finally:
                await response.aclose()
        raise TooManyRedirects(f"{redact(original)} redirects more than {MAX_REDIRECTS} "
                               "times; check the URL")
    except httpx.TimeoutException as exc:
        raise Transient(f"no data for {stall_timeout:g} s ({type(exc).__name__})") from None
    except httpx.TransportError as exc:
        raise Transient(describe(exc, "connection failed")) from None


def _check_addresses(url: httpx.URL, addresses: list[str], *, private_ok: bool,
                     redirected: bool) -> None:
    why = first_refusal(url.host, addresses, private_ok=private_ok)
    if why is not None:
        what = "a redirect target" if redirected else "the download URL"
        raise UrlRefused(f"refusing {what}: {why}")


def _peer(response: httpx.Response) -> str | None:
    """The address the response came from, when the transport tells (real sockets do)."""
    stream = response.extensions.get("network_stream")
    try:
        where = None if stream is None else stream.get_extra_info("server_addr")
    except OSError:  # the peer is already gone (it reset the connection)
        return None
    return str(where[0]) if isinstance(where, tuple) and where else None


def muted(refused: Refused) -> Refused:
    """A refusal that repeats nothing of what an internal address answered."""
    return Refused(refused.kind, INTERNAL, status=refused.status, retry_after=refused.retry_after)


def _probe_answer(url: httpx.URL, status: int, headers: httpx.Headers) -> Probe:
    etag, modified = headers.get("etag"), headers.get("last-modified")
    if status == 206:
        crange = content_range(headers.get("content-range"))
        if crange is not None and crange[0] == 0 and crange[2] is not None:
            return Probe(url, crange[2], True, etag, modified)
    elif status == 416:
        crange = content_range(headers.get("content-range"))
        if crange is not None and crange[2] == 0:
            return Probe(url, 0, False, etag, modified)
    # 200 (Range ignored) or an odd answer: one plain stream.
    length = headers.get("content-length")
    total = int(length) if status == 200 and length is not None and length.isdigit() else None
    return Probe(url, total, False, etag, modified)


async def retrying(once: Callable[[], Awaitable[T]], *, retries: int, rng: random.Random,
                   on_retry: Callable[[int, float, str], None],
                   give_up: Callable[[Transient], DownloadError],
                   sleep: Callable[[float], Awaitable[None]],
                   progress: Callable[[], int] | None = None) -> T:
    """Run `once` until it succeeds; retry Transient failures with backoff (or the origin's
    Retry-After). With `progress`, only consecutive failures that made no progress count
    against `retries`. Raises `give_up(last failure)` past them."""
    failures = 0
    while True:
        before = progress() if progress else 0
        try:
            return await once()
        except Transient as exc:
            if progress is not None and progress() > before:
                failures = 0
            failures += 1
            if failures > retries:
                raise give_up(exc) from None
            delay = exc.retry_after
            if delay is None:
                delay = backoff_delay(failures, rng)
            on_retry(failures, delay, exc.reason)
            await sleep(delay)


def give_up_message(exc: Transient, url: httpx.URL, retries: int) -> DownloadError:
    """The last error, in the user's words: which server, what went wrong, what to do."""
    host = url.host or redact(url)
    tries = f"{retries + 1} tries" if retries else "1 try"
    if exc.status:
        return OriginError(f"{host} kept answering {exc.reason} ({tries}); try again later")
    return OriginUnreachable(f"could not reach {host}: {exc.reason} ({tries}); check the "
                             f"network and the URL ({redact(url)})")
