"""Resumable, segmented, verified HTTP download of one model file.

`download_file` writes into `dest.partial`, records what is done in `dest.partial.json` (the
sidecar) and publishes `dest` only complete and verified. It runs inside the caller's cancel
scope: a cancel stops the bytes at once and leaves the partial and an up-to-date sidecar (written
in a worker thread, see `actors.partial.close_partial`), from which the next call resumes with
`Range` + `If-Range`. From an origin that does not serve byte ranges nothing could resume, so
nothing is kept. Bytes that are not a model file (`DownloadRequest.magic`, `verify`) fail it.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import hashlib
import http
import math
import os
import random
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import ClassVar, Protocol, TypeVar

import attrs
import httpcore
import httpx
import trio

from actors.gguf import GGUFInvalid, check_magic
from actors.partial import (
    Sidecar,
    add_range,
    background_thread,
    close_partial,
    covered,
    look_at_partial,
    missing,
    partial_lock,
    partial_path,
    prefix_end,
    pwrite_all,
    remove_partial,
    sidecar_path,
    write_sidecar,
)
from actors.pump import PumpFailed, PumpProcess, with_pump
from actors.pump_main import HASH_CHUNK, tls_context
from actors.pump_main import content_range as _content_range
from actors.store import fsync_dir

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Errors


class DownloadError(Exception):
    """A download failed for good. `code` is machine-readable; the message says what to do."""

    code: ClassVar[str] = "download_error"


class OriginError(DownloadError):
    """The origin answered, but not with the file (4xx, or 5xx after the retries)."""

    code = "origin_error"


class OriginUnreachable(DownloadError):
    """No usable connection to the origin (refused, reset, stalled) after the retries."""

    code = "origin_unreachable"


class ChecksumMismatch(DownloadError):
    code = "checksum_mismatch"


class SizeMismatch(DownloadError):
    code = "size_mismatch"


class DiskFull(DownloadError):
    code = "disk_full"


class DiskError(DownloadError):
    code = "disk_error"


class UrlRefused(DownloadError):
    """The URL (or a redirect target) is not one modeld will fetch."""

    code = "url_refused"


class TooManyRedirects(DownloadError):
    code = "too_many_redirects"


class FileInvalid(DownloadError):
    """The origin's bytes are not a model file modeld can run (`DownloadRequest.magic` and
    `verify` decide); the partial is deleted, since more of the same bytes cannot mend it."""

    code = "model_file_invalid"


class _ContentChanged(Exception):
    """The origin's answer does not fit the partial: start over. The message says why."""


class _Transient(Exception):
    """One attempt failed in a way worth retrying."""

    def __init__(self, reason: str, *, retry_after: float | None = None, status: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.status = status


# ---------------------------------------------------------------------------------------------
# Public API


@attrs.frozen
class DownloadRequest:
    url: str
    dest: Path  # final file; published only complete and verified
    sha256: str | None = None
    size: int | None = None
    connections: int = 8
    retries: int = 6
    stall_timeout: float = 30.0
    allow_http: bool = False
    min_segment: int = 8 * 1024 * 1024  # below this size one stream is used
    # What the file must start with, checked as soon as its first bytes are in.
    magic: bytes | None = None
    # Checks the complete file before it is published; blocking (run in a thread). Raises
    # GGUFInvalid for a file modeld cannot run (the rule `import` applies: actors.gguf).
    verify: Callable[[Path], object] | None = None


class ProgressSink(Protocol):
    def update(self, done: int, total: int | None) -> None:
        """Called often; must be cheap."""

    def reset(self, reason: str) -> None:
        """What was downloaded is dropped and the download starts over; `reason` says why."""

    def retrying(self, attempt: int, delay: float, reason: str) -> None: ...


async def download_file(
    req: DownloadRequest,
    sink: ProgressSink,
    *,
    client: httpx.AsyncClient | None = None,
    clock: Callable[[], float] = trio.current_time,
) -> None:
    """Download `req.url` to `req.dest`, resuming a partial left by an earlier call.

    Returns once `dest` is published (size, sha256, magic and `verify` checked when given).
    Raises DownloadError (see `code`); cancellation leaves the partial and its sidecar for the
    next call.
    """
    url = _check_url(req.url, allow_http=req.allow_http, previous=None)
    if client is not None:  # a given client (tests, proxies) carries every byte itself
        await _Download(req, sink, client, clock, url, pump=False).run()
        return
    # Loading the CA bundle takes ~30 ms the first time (then it is cached): not on the loop.
    trust = await trio.to_thread.run_sync(tls_context)
    own_client = httpx.AsyncClient(
        follow_redirects=False,
        timeout=_timeout(req),
        limits=httpx.Limits(max_connections=req.connections + 1,
                            max_keepalive_connections=req.connections + 1),
        headers={"Accept-Encoding": "identity"},
        trust_env=False,
        verify=trust,  # the same trust as the pump's own connections
    )
    try:
        await _Download(req, sink, own_client, clock, url, pump=True).run()
    finally:
        # Shielded and bounded: a cancelled download still closes its idle connections.
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await own_client.aclose()


# ---------------------------------------------------------------------------------------------
# Tunables

# httpcore receives at most 64 KiB per read by default; a model file then costs the event loop
# tens of thousands of wake-ups a second. 1 MiB reads cut that per-byte work sixteen-fold
# (see BENCHMARKS.md). Only modeld's downloads use httpx in this process.
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = 1024 * 1024

MAX_REDIRECTS = 10
MAX_RESTARTS = 3  # content changes in one call before giving up
SIDECAR_EVERY = 1.0  # seconds between sidecar writes while bytes flow
WRITE_BUFFER = 1024 * 1024  # bytes gathered before one pwrite (in a worker thread)
WRITE_INTERVAL = 0.2  # seconds: the longest a received byte waits to be written
CLEANUP_BOUND = 5.0  # seconds an attempt's end waits for its close_partial thread
BACKOFF_BASE = 0.25
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 120.0
CONNECT_TIMEOUT = 10.0
PIECES_PER_CONNECTION = 4


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Exponential backoff with jitter: attempt 1 waits 0.5-1 x BACKOFF_BASE, doubling, capped."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(attempt - 1, 30)) * rng.uniform(0.5, 1.0)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or HTTP date), capped."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_CAP)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    delay: float = when.timestamp() - now
    return min(max(0.0, delay), RETRY_AFTER_CAP)


def _timeout(req: DownloadRequest) -> httpx.Timeout:
    return httpx.Timeout(
        connect=min(CONNECT_TIMEOUT, max(req.stall_timeout, 1.0)),
        read=req.stall_timeout,
        write=req.stall_timeout,
        pool=None,
    )


def _redact(url: httpx.URL | str) -> str:
    u = httpx.URL(url) if isinstance(url, str) else url
    return str(u.copy_with(username=None, password=None, query=None))


def _check_url(raw: str, *, allow_http: bool, previous: httpx.URL | None) -> httpx.URL:
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
            f"{what} ({_redact(url)}) contains credentials (user:password@); remove them"
        )
    if not url.host:
        raise UrlRefused(f"{what} has no host")
    if url.scheme == "http" and previous is not None and previous.scheme == "https":
        raise UrlRefused(f"refusing a redirect from https to plain http ({_redact(url)})")
    if url.scheme == "http" and not allow_http:
        raise UrlRefused(
            f"{what} ({_redact(url)}) is plain http; use https or set [download] allow_http"
        )
    return url


def _disk_error(exc: OSError, dest: Path) -> DownloadError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"no space left for {dest.name} in {dest.parent}; free some space and "
                        "download again (a partial that can resume is kept)")
    return DiskError(f"cannot write {partial_path(dest)}: {exc.strerror or exc}")


# ---------------------------------------------------------------------------------------------
# The download


@attrs.define
class _Cursor:
    pos: int


@attrs.frozen
class _Probe:
    url: httpx.URL  # after redirects
    total: int | None
    ranges: bool
    etag: str | None
    last_modified: str | None


@attrs.define(eq=False)
class _Download:
    req: DownloadRequest
    sink: ProgressSink
    client: httpx.AsyncClient
    clock: Callable[[], float]
    url: httpx.URL
    pump: bool = False  # ranged pieces' bytes moved by a pump process (actors/pump.py)
    rng: random.Random = attrs.Factory(random.Random)
    # per attempt
    probe: _Probe | None = None
    fd: int = -1
    done: list[tuple[int, int]] = attrs.Factory(list)  # written to the partial (page cache)
    next_sync: float = 0.0
    syncing: bool = False
    failure: BaseException | None = None
    wrote: trio.Event = attrs.Factory(trio.Event)  # set (and replaced) after every write
    fetching: bool = False
    pumper: PumpProcess | None = None
    hasher: _Hasher | None = None  # sha256 of the file's front while the download runs
    hash_broken: bool = False  # hashing along failed: _finish starts again from byte 0
    # bytes received but not written when a cancel came: (chunks, offset), for close_partial
    leftovers: list[tuple[list[bytes], int]] = attrs.Factory(list)
    magic_checked: bool = False

    async def run(self) -> None:
        dest = self.req.dest
        for _ in range(MAX_RESTARTS + 1):
            try:
                await self._attempt()
            except _ContentChanged as exc:
                await trio.to_thread.run_sync(remove_partial, dest)
                self.sink.reset(str(exc))
                continue
            return
        raise OriginError(f"the file at {_redact(self.url)} kept changing during the download; "
                          "try again later")

    # -- one pass over the file, from probe to publish

    async def _attempt(self) -> None:
        req, dest = self.req, self.req.dest
        probe = self.probe = await self._retrying(self._probe_once, progress=None)
        if req.size is not None and probe.total is not None and probe.total != req.size:
            raise SizeMismatch(f"the origin serves {probe.total} bytes, the catalog expects "
                               f"{req.size}; check the model's url and size")
        side, size = await trio.to_thread.run_sync(look_at_partial, dest)
        why_not = _why_not_resumable(side, size, req.url, probe)
        self.done = list(side.done) if why_not is None and side is not None else []
        if why_not is not None and size > 0:
            self.sink.reset(why_not)
        resumable = why_not is None
        try:
            self.fd = await trio.to_thread.run_sync(self._open_partial, resumable)
        except OSError as exc:
            raise _disk_error(exc, dest) from exc
        # Whether the partial can never become the file: without ranges nothing in it can be
        # resumed, so nothing is kept.
        discard = not probe.ranges
        try:
            self.next_sync = self.clock() + SIDECAR_EVERY
            self.sink.update(covered(self.done), probe.total)
            if not self.pump:
                await self._fetch_and_hash()
                await self._finish()
                return

            async def body(pumper: PumpProcess) -> None:
                self.pumper = pumper
                await self._fetch_and_hash()
                await self._finish()

            try:
                await with_pump(self.fd, body)
            except PumpFailed as exc:
                raise _pump_failure(exc, dest) from None
        except FileInvalid:
            discard = True
            raise
        finally:
            await self._close_partial(discard=discard)

    def _open_partial(self, keep: bool) -> int:
        """Open (or create) the partial, reserving the whole size; checks free space. Blocking;
        waits for the end of an earlier attempt's `close_partial` (the partial's lock)."""
        with partial_lock(self.req.dest):
            return self._open_partial_locked(keep)

    def _open_partial_locked(self, keep: bool) -> int:
        dest, total = self.req.dest, self.probe.total if self.probe else None
        part = partial_path(dest)
        if not keep:
            remove_partial(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if total is not None:
            have = part.stat().st_blocks * 512 if part.exists() else 0
            free = shutil.disk_usage(dest.parent).free
            if free < total - have:
                raise OSError(errno.ENOSPC, f"need {total - have} bytes, {free} free")
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            if total is not None:
                try:
                    os.posix_fallocate(fd, 0, max(total, 1))
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
                os.ftruncate(fd, total)
            else:
                os.ftruncate(fd, 0)
            self._write_sidecar_now(fd, [] if not keep else list(self.done), sync_data=False)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- fetching

    async def _fetch_all(self) -> None:
        probe = self.probe
        assert probe is not None
        if probe.total is None or not probe.ranges:
            self.done = []
            pieces: list[tuple[int, int | None]] = [(0, probe.total)]
            workers = 1
        else:
            gaps = missing(self.done, probe.total)
            if not gaps:
                return
            left = sum(e - s for s, e in gaps)
            if probe.total < self.req.min_segment or self.req.connections <= 1:
                workers, size = 1, left
            else:
                workers = self.req.connections
                size = max(1024 * 1024, math.ceil(left / (workers * PIECES_PER_CONNECTION)))
            pieces = [(p, min(p + size, e)) for s, e in gaps for p in range(s, e, size)]
            workers = min(workers, len(pieces))
        self.failure = None
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(self._run_worker, pieces, nursery.cancel_scope)
        if self.failure is not None:
            raise self.failure

    async def _fetch_and_hash(self) -> None:
        """Fetch everything; with a sha256 to check, hash the complete front of the file while
        the rest arrives, so that little is left to hash at the end."""
        if self.req.sha256 is None:
            await self._fetch_all()
            return
        self.hasher = self.pumper or _LocalHash(self.fd)
        self.hash_broken, self.fetching = False, True
        failure: DownloadError | _ContentChanged | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._hash_along)
            try:
                await self._fetch_all()
            except (DownloadError, _ContentChanged) as exc:
                failure = exc  # raised below, not as an exception group
            finally:
                self.fetching = False
                self.wrote.set()
        if failure is not None:
            raise failure

    async def _hash_along(self) -> None:
        hasher = self.hasher
        assert hasher is not None
        try:
            while self.fetching:
                ready = prefix_end(self.done)
                if ready - hasher.hashed >= HASH_CHUNK:
                    await hasher.hash_upto(ready)
                else:
                    await self.wrote.wait()
        except (OSError, PumpFailed):
            self.hash_broken = True

    async def _run_worker(self, pieces: list[tuple[int, int | None]],
                          scope: trio.CancelScope) -> None:
        try:
            while pieces:
                start, end = pieces.pop(0)
                await self._fetch_piece(start, end)
        except (DownloadError, _ContentChanged) as exc:
            # Recorded, not raised: siblings stop through the scope and run() sees one error,
            # never an exception group.
            if self.failure is None:
                self.failure = exc
            scope.cancel()

    async def _fetch_piece(self, start: int, end: int | None) -> None:
        at = _Cursor(start)
        ranged = self.probe is not None and self.probe.ranges
        await self._retrying(lambda: self._stream_range(at, end),
                             progress=(lambda: at.pos) if ranged else None)

    async def _retrying(self, once: Callable[[], Awaitable[T]],
                        progress: Callable[[], int] | None) -> T:
        """Run `once` until it succeeds; retry transient failures with backoff. With `progress`,
        only consecutive failures that made no progress count against `retries`."""
        failures = 0
        while True:
            before = progress() if progress else 0
            try:
                return await once()
            except _Transient as exc:
                if progress is not None and progress() > before:
                    failures = 0
                failures += 1
                if failures > self.req.retries:
                    raise self._give_up(exc) from None
                delay = exc.retry_after
                if delay is None:
                    delay = backoff_delay(failures, self.rng)
                self.sink.retrying(failures, delay, exc.reason)
                await trio.sleep(delay)

    def _give_up(self, exc: _Transient) -> DownloadError:
        """The last error, in the user's words: which server, what went wrong, what to do."""
        host = httpx.URL(self.url).host or _redact(self.url)
        tries = f"{self.req.retries + 1} tries" if self.req.retries else "1 try"
        if exc.status:
            return OriginError(f"{host} kept answering {exc.reason} ({tries}); try again "
                               "later")
        return OriginUnreachable(f"could not reach {host}: {exc.reason} ({tries}); check the "
                                 f"network and the URL ({_redact(self.url)})")

    @contextlib.asynccontextmanager
    async def _open(self, url: httpx.URL, headers: dict[str, str]
                    ) -> AsyncIterator[tuple[httpx.URL, httpx.Response]]:
        """GET, following redirects by hand; yields the final URL and a streaming response
        with a 2xx or 416 status. Maps transport errors and retryable statuses to _Transient."""
        try:
            for _ in range(MAX_REDIRECTS + 1):
                request = self.client.build_request(
                    "GET", url, headers={"Accept-Encoding": "identity", **headers},
                    timeout=_timeout(self.req))
                response = await self.client.send(request, stream=True, follow_redirects=False)
                try:
                    status = response.status_code
                    if status in (301, 302, 303, 307, 308) and "location" in response.headers:
                        url = _check_url(response.headers["location"],
                                         allow_http=self.req.allow_http, previous=url)
                        continue
                    self._check_status(response)
                    yield url, response
                    return
                finally:
                    await response.aclose()
            raise TooManyRedirects(f"{_redact(self.url)} redirects more than {MAX_REDIRECTS} "
                                   "times; check the URL")
        except httpx.TimeoutException as exc:
            raise _Transient(f"no data for {self.req.stall_timeout:g} s ({type(exc).__name__})"
                             ) from None
        except httpx.TransportError as exc:
            raise _Transient(_describe(exc, "connection failed")) from None

    def _check_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if 200 <= status < 300 or status == 416:
            enc = response.headers.get("content-encoding", "identity").lower()
            if enc != "identity":
                raise OriginError(f"{_redact(self.url)} sent the file {enc}-encoded although "
                                  "asked for identity")
            return
        if status in (408, 429) or status >= 500:
            retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
            raise _Transient(f"HTTP {status} {_phrase(status)}".rstrip(), retry_after=retry_after,
                             status=status)
        raise OriginError(f"{_redact(self.url)} answered HTTP {status}; check the model's url")

    async def _probe_once(self) -> _Probe:
        async with self._open(self.url, {"Range": "bytes=0-0"}) as (url, response):
            etag = response.headers.get("etag")
            modified = response.headers.get("last-modified")
            if response.status_code == 206:
                crange = _content_range(response.headers.get("content-range"))
                if crange is not None and crange[0] == 0 and crange[2] is not None:
                    return _Probe(url, crange[2], True, etag, modified)
            elif response.status_code == 416:
                crange = _content_range(response.headers.get("content-range"))
                if crange is not None and crange[2] == 0:
                    return _Probe(url, 0, False, etag, modified)
            # 200 (Range ignored) or an odd answer: one plain stream; the body is not read.
            length = response.headers.get("content-length")
            total = int(length) if length is not None and length.isdigit() else None
            if response.status_code != 200:
                total = None
            return _Probe(url, total, False, etag, modified)

    async def _stream_range(self, at: _Cursor, end: int | None) -> None:
        """One request for [at.pos, end) (or the whole file without ranges); writes what
        arrives, moving `at` along."""
        probe = self.probe
        assert probe is not None
        headers = {}
        if probe.ranges:
            headers["Range"] = f"bytes={at.pos}-{'' if end is None else end - 1}"
            validator = probe.etag if probe.etag and not probe.etag.startswith("W/") else (
                probe.last_modified)
            if validator:
                headers["If-Range"] = validator
        elif at.pos != 0:
            self.sink.reset("the origin does not serve byte ranges, so the retry starts from "
                            "byte 0")
            self.done.clear()
            at.pos = 0
        if self.pump and probe.ranges and end is not None:
            await self._pump_range(probe.url, headers, at, end)
            return
        async with self._open(probe.url, headers) as (_url, response):
            if probe.ranges:
                self._check_range_answer(response, at.pos)
            elif response.status_code != 200:
                raise _ContentChanged(f"the origin answered HTTP {response.status_code} "
                                      "instead of the file")
            await self._receive(response, at, end)

    async def _pump_range(self, url: httpx.URL, headers: dict[str, str], at: _Cursor,
                          end: int) -> None:
        """Fetch [at.pos, end) through the pump process (actors/pump.py), which moves the
        bytes from socket to file outside this process: the event loop judges the response
        head and records progress, nothing per byte. A cancel stops the child's thread within
        one read; it has stopped writing when this returns, whatever ended it."""
        pumper = self.pumper
        assert pumper is not None
        recorded = at.pos
        failure: DownloadError | _ContentChanged | _Transient | None = None

        def note() -> None:
            nonlocal recorded
            if at.pos > recorded:
                self._record(recorded, at.pos)
                recorded = at.pos
                self.sink.update(covered(self.done), self.probe.total if self.probe else None)

        async def sync_sidecar() -> None:  # progress itself is recorded by `moved`
            nonlocal failure
            try:
                while True:
                    await trio.sleep(WRITE_INTERVAL)
                    await self._check_magic()
                    if self.clock() >= self.next_sync and not self.syncing:
                        await self._sync_sidecar()
            except DownloadError as exc:
                failure = exc  # raised below, not as an exception group
                nursery.cancel_scope.cancel()

        def judge(status: int, head: list[tuple[str, str]]) -> None:
            answer = httpx.Response(status, headers=head)
            if 300 <= status < 400:
                raise _ContentChanged(f"the origin now redirects the file (HTTP {status})")
            self._check_status(answer)
            self._check_range_answer(answer, at.pos)
            if "chunked" in answer.headers.get("transfer-encoding", "").lower():
                raise _Transient("the origin answered a range request with a chunked body")

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sync_sidecar)
                try:
                    await pumper.fetch(
                        scheme=url.scheme, host=url.host,
                        port=url.port or (443 if url.scheme == "https" else 80),
                        target=url.raw_path.decode("ascii"),
                        netloc=url.netloc.decode("ascii"), headers=headers, at=at, end=end,
                        stall_timeout=self.req.stall_timeout, judge=judge, moved=note,
                        expect=(self.probe.total if self.probe else None,
                                self.probe.etag if self.probe else None))
                except PumpFailed as exc:
                    failure = _pump_failure(exc, self.req.dest)
                except (DownloadError, _ContentChanged, _Transient) as exc:
                    failure = exc  # raised below, not as an exception group
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            note()  # synchronous: this runs when cancelled too
        if failure is not None:
            raise failure

    def _check_range_answer(self, response: httpx.Response, pos: int) -> None:
        probe = self.probe
        assert probe is not None
        status = response.status_code
        if status == 200:
            raise _ContentChanged("the origin ignored the Range request and sent the whole "
                                  "file (the file changed, or ranges are no longer served)")
        if status != 206:
            raise _ContentChanged(f"the origin refused a range request (HTTP {status})")
        header = response.headers.get("content-range")
        crange = _content_range(header)
        if crange is None or crange[0] != pos or crange[2] != probe.total:
            raise _ContentChanged(f"the origin's Content-Range ({header}) does not fit "
                                  f"bytes {pos}- of a {probe.total}-byte file")
        etag = response.headers.get("etag")
        if probe.etag and etag and etag != probe.etag:
            raise _ContentChanged(f"the origin's ETag changed from {probe.etag} to {etag}: "
                                  "the file was replaced")

    async def _receive(self, response: httpx.Response, at: _Cursor, end: int | None) -> None:
        chunks: list[bytes] = []
        pending = 0
        flushed_at = trio.current_time()
        try:
            async for chunk in response.aiter_bytes():  # identity only: see _check_status
                if end is not None and at.pos + pending + len(chunk) > end:
                    chunk = chunk[: end - at.pos - pending]
                chunks.append(chunk)
                pending += len(chunk)
                # Write in large blocks, but at least every WRITE_INTERVAL so that progress
                # and the sidecar keep up with slow connections.
                now = trio.current_time()
                if pending >= WRITE_BUFFER or now - flushed_at >= WRITE_INTERVAL:
                    at.pos = await self._write(chunks, at.pos)
                    chunks, pending, flushed_at = [], 0, now
                if end is not None and at.pos + pending >= end:
                    break
        except trio.Cancelled:
            # Keep what already arrived (at most WRITE_BUFFER bytes): `close_partial` writes
            # it in a thread, when the attempt ends.
            if chunks:
                self.leftovers.append((chunks, at.pos))
            raise
        except httpx.TimeoutException:
            at.pos = await self._write(chunks, at.pos)
            raise _Transient(f"no data for {self.req.stall_timeout:g} s") from None
        except httpx.TransportError as exc:
            at.pos = await self._write(chunks, at.pos)
            raise _Transient(_describe(exc, "connection lost")) from None
        at.pos = await self._write(chunks, at.pos)
        if end is not None and at.pos < end:
            raise _Transient("the origin closed the connection early")

    def _record(self, pos: int, end: int) -> None:
        if self.probe is not None and self.probe.ranges:
            add_range(self.done, pos, end)
        else:
            self.done[:] = [(0, end)]
        self.wrote.set()
        self.wrote = trio.Event()

    async def _write(self, chunks: list[bytes], pos: int) -> int:
        """pwrite `chunks` at `pos` in a worker thread, record it, sync the sidecar when due.
        Returns the position after it."""
        if not chunks:
            return pos
        fd = self.fd
        try:
            end = await trio.to_thread.run_sync(pwrite_all, fd, chunks, pos)
        except OSError as exc:
            raise _disk_error(exc, self.req.dest) from exc
        self._record(pos, end)
        self.sink.update(covered(self.done), self.probe.total if self.probe else None)
        await self._check_magic()
        if self.clock() >= self.next_sync and not self.syncing:
            await self._sync_sidecar()
        return end

    async def _check_magic(self) -> None:
        """Once the file's first bytes are in: FileInvalid unless they are `req.magic`, so that
        a URL serving something else fails at once rather than after the whole file."""
        magic = self.req.magic
        if magic is None or self.magic_checked or prefix_end(self.done) < len(magic):
            return
        self.magic_checked = True
        fd = self.fd
        try:
            head = await trio.to_thread.run_sync(os.pread, fd, len(magic), 0)
            check_magic(head, f"the file at {_redact(self.url)}")
        except OSError as exc:
            raise _disk_error(exc, self.req.dest) from exc
        except GGUFInvalid as exc:
            raise FileInvalid(f"{exc.reason} The partial file was deleted; check the "
                              "model's url.") from None

    async def _sync_sidecar(self) -> None:
        self.syncing = True
        self.next_sync = self.clock() + SIDECAR_EVERY
        try:
            snapshot = list(self.done)
            fd = self.fd
            await trio.to_thread.run_sync(lambda: self._write_sidecar_now(fd, snapshot, True))
        except OSError as exc:
            raise _disk_error(exc, self.req.dest) from exc
        finally:
            self.syncing = False

    def _write_sidecar_now(self, fd: int, done: list[tuple[int, int]], sync_data: bool) -> None:
        """fdatasync the data first, so the sidecar never claims bytes that are not on disk."""
        probe = self.probe
        assert probe is not None
        if sync_data:
            os.fdatasync(fd)
        write_sidecar(self.req.dest, Sidecar(self.req.url, probe.etag, probe.last_modified,
                                               probe.total, done))

    async def _close_partial(self, *, discard: bool) -> None:
        """On every exit of an attempt: `close_partial` in a worker thread, shielded from a
        cancel but bounded; past the bound the thread finishes on its own, holding the
        partial's lock, and the next attempt waits for it there."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        probe = self.probe
        side = None if probe is None else Sidecar(self.req.url, probe.etag, probe.last_modified,
                                                  probe.total, list(self.done))
        leftovers, self.leftovers = self.leftovers, []
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_BOUND):
            await trio.to_thread.run_sync(
                lambda: close_partial(self.req.dest, fd, side, leftovers, discard=discard),
                abandon_on_cancel=True)

    # -- verify and publish

    async def _finish(self) -> None:
        req, dest = self.req, self.req.dest
        fd = self.fd
        try:
            size = await trio.to_thread.run_sync(lambda: os.fstat(fd).st_size)
        except OSError as exc:
            raise _disk_error(exc, dest) from exc
        probe = self.probe
        assert probe is not None
        if probe.total is not None and size != probe.total:
            raise OriginUnreachable(f"got {size} of {probe.total} bytes from {_redact(self.url)}")
        if req.size is not None and size != req.size:
            await trio.to_thread.run_sync(remove_partial, dest)
            raise SizeMismatch(f"downloaded {size} bytes, expected {req.size}; check the model's "
                               "url and size")
        if req.sha256 is not None:
            hasher = self.hasher  # set by _fetch_and_hash whenever there is a sha256
            assert hasher is not None
            try:
                if self.hash_broken:  # hashing along the download gave up: from byte 0
                    await hasher.hash_reset()
                await hasher.hash_upto(size)
                digest = await hasher.hexdigest()
            except OSError as exc:
                raise _disk_error(exc, dest) from exc
            except PumpFailed as exc:
                raise _pump_failure(exc, dest) from None
            if digest != req.sha256.lower():
                await trio.to_thread.run_sync(remove_partial, dest)
                raise ChecksumMismatch(
                    f"the downloaded file's sha256 is {digest}, expected {req.sha256.lower()}; "
                    "the partial was deleted; check the model's sha256 or the origin")
        await self._check_magic()
        if req.verify is not None:
            try:
                await trio.to_thread.run_sync(req.verify, partial_path(dest))
            except OSError as exc:
                raise _disk_error(exc, dest) from exc
            except GGUFInvalid as exc:
                raise FileInvalid(f"the file at {_redact(self.url)} is not a model modeld can "
                                  f"run: {exc.reason} The downloaded file was deleted; check "
                                  "the model's url.") from None

        def publish() -> None:
            os.fsync(fd)
            os.replace(partial_path(dest), dest)
            fsync_dir(dest.parent)
            with contextlib.suppress(FileNotFoundError):
                sidecar_path(dest).unlink()

        try:
            await trio.to_thread.run_sync(publish)
        except OSError as exc:
            raise _disk_error(exc, dest) from exc
        self.sink.update(size, size)


def _pump_failure(exc: PumpFailed, dest: Path) -> DownloadError | _Transient:
    if exc.kind == "disk":
        return _disk_error(OSError(exc.errno, exc.reason), dest)
    if exc.kind == "died":
        return DownloadError(f"{exc.reason}; the partial is kept: download again to resume")
    return _Transient(_plain(exc.reason) or exc.reason)


# What transport errors say, as a person would: (pattern in the error's text, plain words).
_PLAIN_REASONS = (
    (re.compile(r"Name or service not known|nodename nor servname|No address associated|"
                r"Temporary failure in name resolution|Errno -[235]\b", re.I), "name not resolved"),
    (re.compile(r"Connection refused|All connection attempts failed", re.I),
     "connection refused"),
    (re.compile(r"Connection reset", re.I), "connection reset"),
    (re.compile(r"Network is unreachable", re.I), "network unreachable"),
    (re.compile(r"No route to host", re.I), "no route to host"),
    (re.compile(r"CERTIFICATE_VERIFY_FAILED", re.I), "its TLS certificate does not verify"),
)


def _describe(exc: BaseException, fallback: str) -> str:
    """A transport error in plain words ("name not resolved", "connection refused"); httpx's
    often has an empty message and keeps the reason (e.g. a certificate that does not verify)
    in its cause."""
    reason, seen = "", exc
    for _ in range(8):  # the first non-empty message down the chain of causes
        reason = str(seen)
        following = seen.__cause__ or seen.__context__
        if reason or following is None:
            break
        seen = following
    return _plain(" | ".join(_messages(exc))) or re.sub(
        r"^\[Errno -?\d+\]\s*", "", reason) or fallback


def _messages(exc: BaseException, depth: int = 0) -> list[str]:
    """Every message down an error's causes and exception groups (trio's "all attempts to
    connect ... failed" keeps the refusals in a group)."""
    if depth > 8:
        return []
    found = [str(exc)]
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found += _messages(inner, depth + 1)
    following = exc.__cause__ or exc.__context__
    if following is not None:
        found += _messages(following, depth + 1)
    return found


def _plain(text: str) -> str | None:
    for pattern, plain in _PLAIN_REASONS:
        if pattern.search(text):
            return plain
    return None


class _Hasher(Protocol):
    """The running sha256 of the file's front, [0, hashed)."""

    hashed: int

    async def hash_upto(self, target: int) -> int: ...

    async def hash_reset(self) -> None: ...

    async def hexdigest(self) -> str: ...


class _LocalHash:
    """`_Hasher` in this process's worker threads, for downloads through a given client (the
    pump process hashes the others: `PumpProcess`). It reads with `pread`, not through a map
    as the pump does: a file shortened under a map raises SIGBUS, which a child may die of
    but the daemon must not."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.hasher = hashlib.sha256()
        self.hashed = 0

    async def hash_upto(self, target: int) -> int:
        """Extend the hash to byte `target` (or the end of the file), one HASH_CHUNK per
        thread hop. Raises OSError."""
        fd, h = self.fd, self.hasher

        def step() -> int:
            background_thread()
            data = os.pread(fd, min(HASH_CHUNK, target - self.hashed), self.hashed)
            h.update(data)
            self.hashed += len(data)  # in the thread, with the update: never half counted
            return len(data)

        while self.hashed < target:
            if not await trio.to_thread.run_sync(step):
                break
        return self.hashed

    async def hash_reset(self) -> None:
        self.hasher, self.hashed = hashlib.sha256(), 0

    async def hexdigest(self) -> str:
        return self.hasher.hexdigest()


def _why_not_resumable(side: Sidecar | None, size: int, url: str, probe: _Probe) -> str | None:
    """Why the partial (`size` bytes, -1 when none) cannot be resumed; None when it can."""
    if size < 0:
        return "there is no partial file"
    if side is None:
        return "the partial's record (its .partial.json sidecar) is missing or unreadable"
    if not probe.ranges:
        return "the origin does not serve byte ranges, so the partial cannot be resumed"
    if side.url != url:
        return "the model's url changed since the partial was downloaded"
    if side.total is None or side.total != probe.total:
        return f"the origin's file size changed from {side.total} to {probe.total} bytes"
    if not _same_validator(side, probe):
        return ("the origin's file changed since the partial was downloaded (its ETag or "
                "Last-Modified differs)")
    return None


def _same_validator(side: Sidecar, probe: _Probe) -> bool:
    if probe.etag or side.etag:
        return side.etag == probe.etag
    return probe.last_modified is not None and side.last_modified == probe.last_modified


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""
