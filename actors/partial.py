"""A download's partial file and its sidecar on disk: where they are, what the sidecar says
is done, and the blocking writes to them (which callers run in worker threads).

`dest.partial` holds the bytes; `dest.partial.json` (the sidecar) lists the byte ranges that
are in it, and the origin's validators, so that a later download can resume.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from pathlib import Path

import attrs

from actors.safe_files import is_own, open_own, read_own, write_atomic


def partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".partial")


def sidecar_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".partial.json")


def partial_bytes(dest: Path) -> int:
    """Bytes done according to the sidecar (0 when none or invalid). Blocking, cheap."""
    side = read_sidecar(dest)
    if side is None or not partial_path(dest).exists():
        return 0
    return covered(side.done)


def remove_partial(dest: Path) -> None:
    """Forget a partial download (file and sidecar). Blocking, cheap."""
    with partial_lock(dest):
        for path in (partial_path(dest), sidecar_path(dest)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def covered(done: list[tuple[int, int]]) -> int:
    return sum(end - start for start, end in done)


def add_range(done: list[tuple[int, int]], start: int, end: int) -> None:
    """Insert [start, end) into a sorted list of disjoint ranges, merging neighbours."""
    if start >= end:
        return
    merged: list[tuple[int, int]] = []
    for s, e in done:
        if e < start or s > end:
            merged.append((s, e))
        else:
            start, end = min(s, start), max(e, end)
    merged.append((start, end))
    merged.sort()
    done[:] = merged


def missing(done: list[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    gaps, pos = [], 0
    for s, e in done:
        if s > pos:
            gaps.append((pos, s))
        pos = max(pos, e)
    if pos < total:
        gaps.append((pos, total))
    return gaps


@attrs.frozen
class Sidecar:
    url: str
    etag: str | None
    last_modified: str | None
    total: int | None
    done: list[tuple[int, int]]

    def to_json(self) -> bytes:
        return json.dumps({
            "version": 1, "url": self.url, "etag": self.etag,
            "last_modified": self.last_modified, "total": self.total,
            "done": [list(r) for r in self.done],
        }).encode()


def read_sidecar(dest: Path) -> Sidecar | None:
    try:
        raw = json.loads(read_own(sidecar_path(dest)))  # never through a link or a FIFO
        done = [(int(s), int(e)) for s, e in raw["done"]]
        total = raw["total"]
        side = Sidecar(str(raw["url"]), raw["etag"], raw["last_modified"],
                        None if total is None else int(total), done)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    bad_types = any(v is not None and not isinstance(v, str) for v in (side.etag,
                                                                       side.last_modified))
    bad_ranges = any(s < 0 or e <= s or (side.total is not None and e > side.total)
                     for s, e in done)
    return None if bad_types or bad_ranges else side


def write_sidecar(dest: Path, side: Sidecar) -> None:
    """Atomically: a new temp file of a random name, fsync, rename. Blocking. (Without the
    directory fsync: this runs every second while bytes flow, and a sidecar lost in a crash
    only costs re-fetching what it described.)"""
    write_atomic(sidecar_path(dest), side.to_json(), sync_dir=False)


def prefix_end(done: list[tuple[int, int]]) -> int:
    """How far the file is complete from byte 0."""
    return done[0][1] if done and done[0][0] == 0 else 0


# One lock per partial file, held by whichever thread changes it. An attempt's end runs in a
# worker thread that a cancelled caller may stop waiting for (see `close_partial`); the next
# attempt of the same file takes the lock before touching the file, so the two never write it
# at once. Re-entrant: `remove_partial` runs under it and on its own.
_locks: dict[Path, threading.RLock] = {}
_locks_guard = threading.Lock()


def partial_lock(dest: Path) -> threading.RLock:
    with _locks_guard:
        return _locks.setdefault(dest, threading.RLock())


def look_at_partial(dest: Path) -> tuple[Sidecar | None, int]:
    """The sidecar of an existing partial (None when either is missing or invalid), and the
    partial's size in bytes (-1 when there is none). Blocking, cheap."""
    with partial_lock(dest):
        part = partial_path(dest)
        try:
            size = part.lstat().st_size
        except FileNotFoundError:
            return None, -1
        if not is_own(part):
            # A link or a hard link planted at the partial's name: never resumed (that would
            # write into its target); the name is removed, its target left alone.
            remove_partial(dest)
            return None, -1
        return read_sidecar(dest), size


def open_partial(dest: Path, side: Sidecar, *, keep: bool) -> int:
    """Open (or create) the partial for a download of `side.total` bytes (None: unknown),
    reserving the whole size (the caller checked the free space: actors/disk.py), and write
    `side` as its sidecar.
    Without `keep`, an old partial is removed first. Blocking; waits for the end of an earlier
    attempt's `close_partial` (the partial's lock). Raises OSError (ENOSPC: too little space)."""
    with partial_lock(dest):
        total, part = side.total, partial_path(dest)
        if not keep:
            remove_partial(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = open_own(part)  # a link or a hard link planted there is refused
        try:
            if total is not None:
                try:
                    os.posix_fallocate(fd, 0, max(total, 1))
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
            os.ftruncate(fd, total or 0)
            write_sidecar(dest, side)
        except BaseException:
            os.close(fd)
            raise
        return fd


def sync_sidecar(dest: Path, fd: int, side: Sidecar) -> None:
    """fdatasync the partial open as `fd`, then write `side`: the sidecar never claims bytes
    that are not on disk. Blocking."""
    os.fdatasync(fd)
    write_sidecar(dest, side)


def close_partial(dest: Path, fd: int, side: Sidecar | None, *, discard: bool) -> None:
    """End an attempt's use of the partial open as `fd`, whatever ended it: record `side` in the
    sidecar, and close `fd`. With `discard` (nothing in the partial can be resumed), remove the
    partial and its sidecar instead. Never raises for the file's sake: what cannot be recorded
    is simply fetched again. Blocking (an fsync of the sidecar), under the partial's lock; a
    no-op on the sidecar when the partial was published.

    It does not fdatasync the data (that could take seconds): after a power cut right here a
    claimed range may read back as zeros, which the sha256 check catches."""
    with partial_lock(dest):
        try:
            if discard:
                remove_partial(dest)
                return
            if side is None or not partial_path(dest).exists():
                return
            with contextlib.suppress(OSError):
                write_sidecar(dest, side)
        finally:
            os.close(fd)


def held_marker(dest: Path) -> Path:
    """Marks a partial that must not resume by itself at start (cancelled or failed)."""
    return dest.with_name(dest.name + ".held")
