"""Disk admission: a file whose size is known is refused before any byte is written when it
would not fit on the storage filesystem with a margin to spare."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from actors.errors import InsufficientStorage

DISK_MARGIN = 64 * 1024 * 1024  # bytes left free beyond a new file (records, logs, temp files)

FreeSpace = Callable[[Path], int]


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of `path` (blocks)."""
    return shutil.disk_usage(path).free


def check_fits(need: int, free: int, what: str) -> None:
    """Raise InsufficientStorage (507) with the numbers when `need` more bytes would leave less
    than DISK_MARGIN of `free`."""
    if need + DISK_MARGIN > free:
        raise InsufficientStorage(
            f"{what} needs {need / 1e9:.2f} GB ({need} bytes) but the storage filesystem has "
            f"{max(0, free - DISK_MARGIN) / 1e9:.2f} GB free ({free} bytes, of which "
            f"{DISK_MARGIN} are kept free); free some space (modeld du shows what the models "
            "take) or move [storage] dir"
        )
