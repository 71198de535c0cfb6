"""One download, from probe to publish: which ranges to fetch and over how many connections,
retries, what the sidecar records, and the checks before the file is published.

The daemon probes the origin (actors/download/origin.py) and decides; the bytes move in a pump
child (actors/pump.py) that writes them into the partial and hashes its front. The daemon sees
positions, never bytes.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import httpx
import trio

from actors.disk import allocated_bytes, check_room
from actors.download.errors import (
    ChecksumMismatch,
    ContentChanged,
    DiskFull,
    DownloadError,
    FileInvalid,
    OriginError,
    SizeMismatch,
    TooSlow,
    Transient,
    UrlRefused,
    disk_error,
    plain,
)
from actors.download.hashing import FrontHash
from actors.download.origin import (
    INTERNAL,
    Probe,
    Resolve,
    from_refusal,
    give_up_message,
    muted,
    port_of,
    probe_once,
    redact,
    resolve_host,
    retrying,
)
from actors.download.request import DownloadRequest, ProgressSink
from actors.errors import InsufficientStorage
from actors.gguf import GGUFInvalid, check_magic
from actors.heads import Refused
from actors.partial import (
    Sidecar,
    add_range,
    close_partial,
    covered,
    look_at_partial,
    missing,
    open_partial,
    partial_path,
    prefix_end,
    remove_partial,
    sidecar_path,
    sync_sidecar,
)
from actors.pump import PumpFailed, PumpProcess, with_pump
from actors.safe_files import fsync_dir

T = TypeVar("T")

MAX_RESTARTS = 3  # content changes in one call before giving up
SIDECAR_EVERY = 1.0  # seconds between sidecar writes while bytes flow
CHECK_EVERY = 0.2  # seconds between looks at the file's magic and the sidecar's due time
CLEANUP_BOUND = 5.0  # seconds an attempt's end waits for its close_partial thread
PIECES_PER_CONNECTION = 4
OVERLAP = 4096  # bytes a resumed range re-fetches before its start, to compare (no sha256)


@attrs.define
class _Cursor:
    pos: int


@attrs.define(eq=False)
class Download:
    req: DownloadRequest
    sink: ProgressSink
    client: httpx.AsyncClient  # for the probe
    clock: Callable[[], float]
    url: httpx.URL
    rng: random.Random = attrs.Factory(random.Random)
    resolve: Resolve = resolve_host
    # per attempt
    probe: Probe | None = None
    fd: int = -1
    done: list[tuple[int, int]] = attrs.Factory(list)  # written to the partial (page cache)
    next_sync: float = 0.0
    syncing: bool = False
    failure: BaseException | None = None
    wrote: trio.Event = attrs.Factory(trio.Event)  # set (and replaced) after every write
    connections: int = 0  # ranges being fetched right now (each its own connection)
    fetching: bool = False
    pumper: PumpProcess | None = None
    magic_checked: bool = False

    async def run(self) -> None:
        dest = self.req.dest
        for _ in range(MAX_RESTARTS + 1):
            try:
                await self._attempt()
            except ContentChanged as exc:
                await trio.to_thread.run_sync(remove_partial, dest)
                self.sink.reset(str(exc))
                continue
            return
        raise OriginError(f"the file at {redact(self.url)} kept changing during the download; "
                          "try again later")

    # -- one pass over the file, from probe to publish

    async def _attempt(self) -> None:
        req, dest = self.req, self.req.dest
        probe = self.probe = await self._retrying(self._probe_once, progress=None)
        if req.size is not None and probe.total is not None and probe.total != req.size:
            serves = "another size" if probe.internal else f"{probe.total} bytes"
            raise SizeMismatch(f"the origin serves {serves}, the catalog expects "
                               f"{req.size}; check the model's url and size")
        side, size = await trio.to_thread.run_sync(look_at_partial, dest)
        why_not = _why_not_resumable(side, size, req.url, probe)
        self.done = list(side.done) if why_not is None and side is not None else []
        if why_not is not None and size > 0:
            self.sink.reset(why_not)
        if probe.total is not None:  # known now: refused before any byte when it cannot fit
            await trio.to_thread.run_sync(self._check_room, probe.total, why_not is None)
        start = self._sidecar()
        try:
            self.fd = await trio.to_thread.run_sync(
                lambda: open_partial(dest, start, keep=why_not is None))
        except OSError as exc:
            raise disk_error(exc, dest) from exc
        # Without ranges nothing in the partial can be resumed, so nothing is kept.
        discard = not probe.ranges
        try:
            self.next_sync = self.clock() + SIDECAR_EVERY
            self.sink.update(covered(self.done), probe.total)

            async def body(pumper: PumpProcess) -> None:
                self.pumper = pumper
                await self._fetch_and_hash(FrontHash(pumper) if req.sha256 else None)

            try:
                await with_pump(self.fd, body)
            except PumpFailed as exc:
                raise self._pump_failure(exc) from None
        except FileInvalid:
            discard = True
            raise
        finally:
            await self._close_partial(discard=discard)

    def _check_room(self, total: int, keep: bool) -> None:
        """Room for the `total`-byte file (less what a kept partial holds) with [storage]
        min_free to spare, or DiskFull. Blocking."""
        dest = self.req.dest
        have = allocated_bytes(partial_path(dest)) if keep else 0
        try:
            check_room(dest.parent, max(0, total - have), "the download", self.req.min_free)
        except InsufficientStorage as exc:
            raise DiskFull(str(exc)) from None
        except OSError as exc:
            raise disk_error(exc, dest) from exc

    @property
    def known_size(self) -> int | None:
        """The file's size as the catalog or the origin's probe tells it (None: unknown)."""
        if self.req.size is not None:
            return self.req.size
        return None if self.probe is None else self.probe.total

    def _sidecar(self) -> Sidecar:
        probe = self.probe
        assert probe is not None
        return Sidecar(self.req.url, probe.etag, probe.last_modified, probe.total,
                       list(self.done))

    async def _probe_once(self) -> Probe:
        return await probe_once(self.client, self.url, allow_http=self.req.allow_http,
                                stall_timeout=self.req.stall_timeout,
                                allow_private=self.req.allow_private, resolve=self.resolve,
                                own_headers=self.req.headers)

    async def _retrying(self, once: Callable[[], Awaitable[T]],
                        progress: Callable[[], int] | None) -> T:
        return await retrying(
            once, retries=self.req.retries, rng=self.rng, on_retry=self.sink.retrying,
            give_up=lambda exc: give_up_message(exc, self.url, self.req.retries),
            sleep=trio.sleep, progress=progress)

    # -- fetching

    async def _fetch_and_hash(self, hasher: FrontHash | None) -> None:
        """Fetch everything, then check and publish. With a sha256 to check, the complete
        front of the file is hashed while the rest arrives."""
        if hasher is None:
            await self._fetch_all()
        else:
            self.fetching = True
            failure: DownloadError | ContentChanged | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hasher.follow, lambda: prefix_end(self.done),
                                   lambda: self.wrote, lambda: self.fetching)
                try:
                    await self._fetch_all()
                except (DownloadError, ContentChanged) as exc:
                    failure = exc  # raised below, not as an exception group
                finally:
                    self.fetching = False
                    self.wrote.set()
            if failure is not None:
                raise failure
        await self._finish(hasher)

    async def _fetch_all(self) -> None:
        probe = self.probe
        assert probe is not None
        if probe.total is None or not probe.ranges:
            # To the body's end: the pump stops one byte past a known size (`cap`).
            self.done = []
            pieces: list[tuple[int, int | None]] = [(0, None)]
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

    async def _run_worker(self, pieces: list[tuple[int, int | None]],
                          scope: trio.CancelScope) -> None:
        try:
            while pieces:
                start, end = pieces.pop(0)
                at = _Cursor(start)
                ranged = self.probe is not None and self.probe.ranges
                await self._retrying(lambda: self._fetch_range(at, end),  # noqa: B023
                                     progress=(lambda: at.pos) if ranged else None)  # noqa: B023
        except (DownloadError, ContentChanged) as exc:
            # Recorded, not raised: siblings stop through the scope and run() sees one error,
            # never an exception group.
            if self.failure is None:
                self.failure = exc
            scope.cancel()

    async def _fetch_range(self, at: _Cursor, end: int | None) -> None:
        """Fetch [at.pos, end) (or the whole file without ranges) through the pump, which
        moves the bytes from socket to file outside this process: the event loop records
        progress, nothing per byte. A cancel stops the child's thread within one read; it has
        stopped writing when this returns, whatever ended it."""
        probe, pumper = self.probe, self.pumper
        assert probe is not None and pumper is not None
        # The request's own headers only where the probe still sent them (its origin).
        headers = dict(self.req.headers) if probe.credentialed else {}
        overlap = 0
        if probe.ranges and end is not None:
            overlap = self._overlap(at.pos)
            headers["Range"] = f"bytes={at.pos - overlap}-{end - 1}"
            validator = probe.etag if probe.etag and not probe.etag.startswith("W/") else (
                probe.last_modified)
            if validator:
                headers["If-Range"] = validator
        elif at.pos != 0:
            self.sink.reset("the origin does not serve byte ranges, so the retry starts from "
                            "byte 0")
            self.done.clear()
            at.pos = 0
        recorded = at.pos
        failure: DownloadError | ContentChanged | Transient | None = None

        def note() -> None:
            nonlocal recorded
            if at.pos > recorded:
                self._record(recorded, at.pos)
                recorded = at.pos

        async def keep_checking() -> None:  # progress itself is recorded by `note`
            nonlocal failure
            try:
                while True:
                    await trio.sleep(CHECK_EVERY)
                    await self._check_magic()
                    if self.clock() >= self.next_sync and not self.syncing:
                        await self._sync_sidecar()
            except DownloadError as exc:
                failure = exc  # raised below, not as an exception group
                nursery.cancel_scope.cancel()

        url, known = probe.url, self.known_size
        self.connections += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_checking)
                try:
                    await pumper.fetch(
                        scheme=url.scheme, host=url.host,
                        port=port_of(url), private_ok=probe.private_ok,
                        target=url.raw_path.decode("ascii"),
                        netloc=url.netloc.decode("ascii"), headers=headers, at=at, end=end,
                        stall_timeout=self.req.stall_timeout, moved=note,
                        total=probe.total, etag=probe.etag, ranged=probe.ranges,
                        cap=None if known is None else known + 1,
                        min_free=self.req.min_free if known is None else 0, overlap=overlap,
                        min_rate=self.req.min_rate, rate_window=self.req.rate_window)
                except PumpFailed as exc:
                    failure = self._pump_failure(exc)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.connections -= 1
            note()  # synchronous: this runs when cancelled too
        if failure is not None:
            raise failure
        await self._check_magic()

    def _overlap(self, pos: int) -> int:
        """Bytes before `pos` to fetch again and compare with the partial's (the pump does):
        where a range continues bytes already held, without a sha256 to catch a file that
        changed under the same validator, OVERLAP of them."""
        if self.req.sha256 is not None or pos < OVERLAP:
            return 0
        held = any(s <= pos - OVERLAP and pos <= e for s, e in self.done)
        return OVERLAP if held else 0

    def _pump_failure(self, exc: PumpFailed) -> DownloadError | ContentChanged | Transient:
        if exc.kind == "disk":
            return disk_error(OSError(exc.errno, exc.reason), self.req.dest)
        if exc.kind == "full":  # a file of unknown size reached [storage] min_free
            return DiskFull(f"{exc.reason}; free some space and download again")
        if exc.kind == "size":  # more bytes than the known size: never resumed or retried
            return SizeMismatch(f"{exc.reason}; check the model's url and size")
        if exc.kind == "slow":  # a drip: more of the same would not help
            return TooSlow(f"{exc.reason}; the partial is kept: download again to resume")
        if exc.kind == "refused":  # the address rule (actors/addresses.py)
            return UrlRefused(f"refusing the download's address: {exc.reason}")
        if exc.kind == "died":
            return DownloadError(f"{exc.reason}; the partial is kept: download again to resume")
        internal = self.probe is not None and self.probe.internal
        if exc.kind in ("changed", "origin"):
            refused = Refused(exc.kind, exc.reason, status=exc.status)
            return from_refusal(muted(refused) if internal else refused, self.url)
        reason = INTERNAL if internal and exc.status else plain(exc.reason) or exc.reason
        return Transient(reason, retry_after=exc.retry_after, status=exc.status)

    def _record(self, pos: int, end: int) -> None:
        if self.probe is not None and self.probe.ranges:
            add_range(self.done, pos, end)
        else:
            self.done[:] = [(0, end)]
        self.wrote.set()
        self.wrote = trio.Event()
        self.sink.update(covered(self.done), self.probe.total if self.probe else None,
                         connections=self.connections)

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
            check_magic(head, f"the file at {redact(self.url)}")
        except OSError as exc:
            raise disk_error(exc, self.req.dest) from exc
        except GGUFInvalid as exc:
            raise FileInvalid(f"{exc.reason} The partial file was deleted; check the "
                              "model's url.") from None

    async def _sync_sidecar(self) -> None:
        self.syncing = True
        self.next_sync = self.clock() + SIDECAR_EVERY
        try:
            side, fd = self._sidecar(), self.fd
            await trio.to_thread.run_sync(sync_sidecar, self.req.dest, fd, side)
        except OSError as exc:
            raise disk_error(exc, self.req.dest) from exc
        finally:
            self.syncing = False

    async def _close_partial(self, *, discard: bool) -> None:
        """On every exit of an attempt: `close_partial` in a worker thread, shielded from a
        cancel but bounded; past the bound the thread finishes on its own, holding the
        partial's lock, and the next attempt waits for it there."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        side = None if self.probe is None else self._sidecar()
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_BOUND):
            await trio.to_thread.run_sync(
                lambda: close_partial(self.req.dest, fd, side, discard=discard),
                abandon_on_cancel=True)

    # -- verify and publish

    async def _finish(self, hasher: FrontHash | None) -> None:
        req, dest, fd = self.req, self.req.dest, self.fd
        try:
            size = await trio.to_thread.run_sync(lambda: os.fstat(fd).st_size)
        except OSError as exc:
            raise disk_error(exc, dest) from exc
        known = self.known_size
        if known is not None and size != known:  # an origin whose body did not fit its size
            await trio.to_thread.run_sync(remove_partial, dest)
            raise SizeMismatch(f"downloaded {size} bytes, expected {known}; check the model's "
                               "url and size")
        if req.sha256 is not None:
            assert hasher is not None
            try:
                digest = await hasher.hexdigest(size)
            except OSError as exc:
                raise disk_error(exc, dest) from exc
            except PumpFailed as exc:
                raise self._pump_failure(exc) from None
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
                raise disk_error(exc, dest) from exc
            except GGUFInvalid as exc:
                raise FileInvalid(f"the file at {redact(self.url)} is not a model modeld can "
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
            raise disk_error(exc, dest) from exc
        self.sink.update(size, size)


def _why_not_resumable(side: Sidecar | None, size: int, url: str, probe: Probe) -> str | None:
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


def _same_validator(side: Sidecar, probe: Probe) -> bool:
    if probe.etag or side.etag:
        return side.etag == probe.etag
    return probe.last_modified is not None and side.last_modified == probe.last_modified
