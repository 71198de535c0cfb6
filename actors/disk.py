"""Disk admission, the one free-space rule: a file whose size is known is refused before any byte
is written when it would not fit on the storage filesystem with `[storage] min_free` to spare (an
upload, a download whose size the catalog or the origin's probe tells); a download of unknown
size stops when the free space falls to that same margin (the pump checks, actors/pump_body.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from actors.errors import InsufficientStorage

# The default of [storage] min_free: bytes left free beyond a new file (records, logs, temp files).
DISK_MARGIN = 64 * 1024 * 1024

FreeSpace = Callable[[Path], int]


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of `path` (blocks)."""
    return shutil.disk_usage(path).free


def allocated_bytes(path: Path) -> int:
    """Bytes of disk `path` already holds (its blocks; 0 when missing). Blocking, cheap."""
    try:
        return path.lstat().st_blocks * 512
    except FileNotFoundError:
        return 0


def check_room(folder: Path, need: int, what: str, margin: int = DISK_MARGIN,
               free_space: FreeSpace = free_bytes) -> None:
    """`check_fits` against the free space of the filesystem of `folder` (made when missing).
    Blocking, cheap."""
    folder.mkdir(parents=True, exist_ok=True)
    check_fits(need, free_space(folder), what, margin)


def check_fits(need: int, free: int, what: str, margin: int = DISK_MARGIN) -> None:
    """Raise InsufficientStorage (507) with the numbers when `need` more bytes would leave less
    than `margin` ([storage] min_free) of `free`."""
    if need + margin > free:
        raise InsufficientStorage(
            f"{what} needs {need / 1e9:.2f} GB ({need} bytes) but the storage filesystem has "
            f"{max(0, free - margin) / 1e9:.2f} GB free ({free} bytes, of which "
            f"{margin} are kept free: [storage] min_free); free some space (modeld du shows "
            "what the models take) or move [storage] dir"
        )
