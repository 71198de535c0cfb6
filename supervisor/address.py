"""Where a running daemon listens, recorded in its storage dir for the command line to find.

`<storage dir>/daemon.json` holds `{"url": ..., "pid": ...}` while the daemon listens; it is
removed when the daemon stops. A daemon started with `make run` (storage `./state`) or with
`--port 0` is thus found by `modeld ls` without `--url`. A record whose process is gone is
ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from actors.safe_files import read_own, write_atomic

ADDRESS_FILE = "daemon.json"
DEFAULT_STORAGE = Path("~/.local/share/modeld")


def write_address(storage: Path, url: str) -> None:
    """Record that this process listens at `url` (blocking; rename makes it whole or absent)."""
    path = storage / ADDRESS_FILE
    write_atomic(path, json.dumps({"url": url, "pid": os.getpid()}).encode(), sync_dir=False)


def clear_address(storage: Path) -> None:
    """Remove the record, if it is this process's."""
    path = storage / ADDRESS_FILE
    if _pid(path) == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()


def running_url(storage_dirs: Iterable[Path]) -> str | None:
    """The URL of a live daemon recorded in the first of `storage_dirs` that has one."""
    for storage in storage_dirs:
        url = _read(storage.expanduser() / ADDRESS_FILE)
        if url is not None:
            return url
    return None


def _pid(path: Path) -> int | None:
    try:
        data = json.loads(read_own(path))
    except (OSError, ValueError):
        return None
    pid = data.get("pid") if isinstance(data, dict) else None
    return pid if isinstance(pid, int) and pid > 0 else None


def _read(path: Path) -> str | None:
    try:
        data = json.loads(read_own(path))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    url, pid = data.get("url"), data.get("pid")
    if not isinstance(url, str) or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, as another user
    return url
