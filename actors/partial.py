"""A download's partial file and its sidecar on disk: where they are, what the sidecar says
is done, and the blocking writes to them (which callers run in worker threads).

`dest.partial` holds the bytes; `dest.partial.json` (the sidecar) lists the byte ranges that
are in it, and the origin's validators, so that a later download can resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import attrs


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
        raw = json.loads(sidecar_path(dest).read_bytes())
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
    """Atomically: temp file, fsync, rename. Blocking. (Not `store.write_atomic`: this runs every
    second while bytes flow, so it skips the directory fsync; a sidecar lost in a crash only
    costs re-fetching what it described.)"""
    path = sidecar_path(dest)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, side.to_json())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


_thread_state = threading.local()
BACKGROUND_NICENESS = 10


def background_thread() -> None:
    """Lower this worker thread's CPU priority (once per thread). Writing and hashing model
    files can use a whole core; the event loop thread must still get the CPU at once to
    answer requests. Raising one's own niceness needs no privilege."""
    if getattr(_thread_state, "lowered", False):
        return
    _thread_state.lowered = True
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)


def pwrite_all(fd: int, chunks: Sequence[bytes | memoryview], pos: int) -> int:
    """Write `chunks` at `pos` (all of them); return the position after them. Blocking."""
    background_thread()
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            n = os.pwrite(fd, view, pos)
            pos += n
            view = view[n:]
    return pos


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
        try:
            size = partial_path(dest).stat().st_size
        except FileNotFoundError:
            return None, -1
        return read_sidecar(dest), size


def close_partial(dest: Path, fd: int, side: Sidecar | None,
                  leftovers: Sequence[tuple[Sequence[bytes], int]], *, discard: bool) -> None:
    """End an attempt's use of the partial open as `fd`, whatever ended it: write the bytes
    that had arrived but were not written yet (`leftovers`: chunks and their offset), record
    them with `side` in the sidecar, and close `fd`. With `discard` (nothing in the partial can
    be resumed), remove the partial and its sidecar instead. Never raises for the file's sake:
    bytes that cannot be written are simply fetched again. Blocking (writes, an fsync of the
    sidecar), under the partial's lock; a no-op on the sidecar when the partial was published.

    It does not fdatasync the data (that could take seconds): after a power cut right here a
    claimed range may read back as zeros, which the sha256 check catches."""
    with partial_lock(dest):
        try:
            if discard:
                remove_partial(dest)
                return
            if side is None or not partial_path(dest).exists():
                return
            done = list(side.done)
            for chunks, pos in leftovers:
                try:
                    end = pwrite_all(fd, chunks, pos)
                except OSError:
                    continue
                add_range(done, pos, end)
            with contextlib.suppress(OSError):
                write_sidecar(dest, attrs.evolve(side, done=done))
        finally:
            os.close(fd)


def held_marker(dest: Path) -> Path:
    """Marks a partial that must not resume by itself at start (cancelled or failed)."""
    return dest.with_name(dest.name + ".held")
