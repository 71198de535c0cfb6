"""How modeld creates and opens files in its storage dir, so that a link planted there by
someone else is never followed and a hard link to an outside file is never written through.

- New files (temps, markers) are created with O_CREAT | O_EXCL | O_NOFOLLOW after removing
  whatever has the name (unlink removes a link itself, never its target).
- Files that must survive a crash whole are written to a new temp with a random name (O_EXCL)
  and renamed over their name (`write_atomic`); a crash leaves the temp, `.<name>.*.tmp`,
  which the store removes at start.
- An existing file opened for writing must be a regular file with one link (`open_own`).
- Records are read only when they are regular files, never through a link, never waiting on a
  FIFO, and only up to a size limit (`read_own`).
- The storage dir and its subdirectories must belong to the daemon's user and be writable by
  nobody else (`check_private_dir`), or start-up stops with the path and the fix.
Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
from pathlib import Path

NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeFile(OSError):
    """A file modeld will not write into: a link, not a regular file, or a hard link."""


def open_new(path: Path, flags: int = os.O_WRONLY, mode: int = 0o600) -> int:
    """Create `path` afresh and open it: what had the name (a stale temp, a planted link) is
    removed first, and the create fails rather than follow anything."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | NOFOLLOW, mode)


def _open_no_link(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open with O_NOFOLLOW: a link at `path` is UnsafeFile, not followed."""
    try:
        return os.open(path, flags | NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(errno.ELOOP, f"{path} is a link; modeld does not follow links "
                             "in its storage dir") from None
        raise


def open_own(path: Path, flags: int = os.O_RDWR, mode: int = 0o644, *,
             create: bool = True) -> int:
    """Open `path` (for writing), creating it when absent if `create`; never through a link,
    and never a file that is not a regular file with one link (raises UnsafeFile)."""
    fd = _open_no_link(path, flags | (os.O_CREAT if create else 0), mode)
    try:
        check_own(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_own(fd: int, path: Path) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        raise UnsafeFile(errno.EPERM, f"{path} is not a regular file with a single link; "
                         "modeld does not write through links in its storage dir")


def is_own(path: Path) -> bool:
    """Whether `path` is a regular file with one link (not followed). Blocking, cheap."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


def touch_new(path: Path) -> None:
    """An empty marker file at `path`, made afresh (never through a link)."""
    os.close(open_new(path))


def write_atomic(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Write `data` to a new temp file beside `path` (a random name, O_EXCL), fsync it and rename
    it onto `path`: a crash leaves the old or the new content, and a link at `path` is
    replaced, never followed. Without `sync_dir` the rename itself may be lost in a crash (for
    files rewritten often, whose loss costs little)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def temp_name(name: str) -> re.Pattern[str]:
    """What `write_atomic`'s temps beside a file called `name` look like."""
    return re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]{{8}}\.tmp")


def read_own(path: Path, limit: int = 1 << 20) -> bytes:
    """The content of the regular file `path`, at most `limit` bytes. Raises FileNotFoundError
    when there is none, UnsafeFile when it is a link or not a regular file (a FIFO is opened
    without waiting for a writer, then refused), or too large."""
    fd = _open_no_link(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(errno.EPERM, f"{path} is not a regular file")
        if st.st_size > limit:
            raise UnsafeFile(errno.EFBIG, f"{path} is larger than {limit} bytes")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UnsafeFile(errno.EFBIG, f"{path} is larger than {limit} bytes")
    return data


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UnsafeDir(Exception):
    pass


def check_private_dir(path: Path) -> None:
    """Raise UnsafeDir unless `path` (a link to it is followed: models moved to a bigger disk)
    is a directory of this user that no other user may write to (group-writable only for the
    user's own primary group, as with per-user groups)."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDir(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafeDir(f"{path} belongs to uid {st.st_uid}, not to this user "
                        f"(uid {os.geteuid()}); chown it, or set [storage] dir to a directory "
                        "of modeld's own")
    foreign_group = st.st_gid != os.getegid()
    if st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and foreign_group):
        raise UnsafeDir(f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o});"
                        f" run: chmod go-w {path}")
