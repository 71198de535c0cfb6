"""Disk admission: a file whose size is known is refused before any byte is written when it
would not fit on the storage filesystem with `[storage] min_free` to spare; a download of unknown
size stops when the free space falls to that margin (the pump checks, actors/pump_body.py)."""

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
