"""Talking to the origin from the daemon: which URLs modeld fetches, the probe (one `Range:
bytes=0-0` GET, following redirects by hand) that learns the file's size, whether ranges are
served and its validators, and the retry rule. The file's bytes never come here: the pump child
fetches them (actors/pump.py)."""

from __future__ import annotations

import random
import ssl
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import httpx

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


@attrs.frozen
class Probe:
    url: httpx.URL  # after redirects
    total: int | None
    ranges: bool
    etag: str | None
    last_modified: str | None
    # Whether the request's own headers still go to `url` (no redirect left the origin).
    credentialed: bool = False


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
                     stall_timeout: float,
                     own_headers: tuple[tuple[str, str], ...] = ()) -> Probe:
    """One probe of the file at `url`, with `own_headers` while no redirect left its origin.
    Raises Transient (retry), DownloadError."""
    original = url
    extra = dict(own_headers)
    try:
        for _ in range(MAX_REDIRECTS + 1):
            request = client.build_request(
                "GET", url,
                headers={**extra, "Accept-Encoding": "identity", "Range": "bytes=0-0"},
                timeout=timeout(stall_timeout))
            response = await client.send(request, stream=True, follow_redirects=False)
            try:  # the body is never read
                status, headers = response.status_code, response.headers
                if status in (301, 302, 303, 307, 308) and "location" in headers:
                    url = check_url(headers["location"], allow_http=allow_http, previous=url)
                    if not same_origin(url, original):
                        extra = {}  # dropped for good: never sent past another origin
                    continue
                try:
                    judge_status(status, header_fields(headers.multi_items()))
                except Refused as refusal:
                    raise from_refusal(refusal, original) from None
                return attrs.evolve(_probe_answer(url, status, headers),
                                    credentialed=bool(extra))
            finally:
                await response.aclose()
        raise TooManyRedirects(f"{redact(original)} redirects more than {MAX_REDIRECTS} "
                               "times; check the URL")
    except httpx.TimeoutException as exc:
        raise Transient(f"no data for {stall_timeout:g} s ({type(exc).__name__})") from None
    except httpx.TransportError as exc:
        raise Transient(describe(exc, "connection failed")) from None


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
