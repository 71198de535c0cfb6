"""Handing written bytes to the disk as they come (Linux `sync_file_range`), so that the fsync
before publishing a file finds little left to write: downloads (the pump child) and uploads
(PUT /model/{id}/file) both write this way. Standard library only (the pump child imports it)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import cast

WRITEBACK_EVERY = 8 * 1024 * 1024  # bytes written before they are handed to the disk
SYNC_FILE_RANGE_WRITE = 2


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", function)


_sync_file_range = _libc_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Start writing [offset, offset + length) to the disk without waiting (Linux), so that the
    fsync before publishing finds little left to write. Best effort: False where it cannot."""
    if _sync_file_range is None:
        return False
    return length <= 0 or _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE) == 0
