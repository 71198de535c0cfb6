"""What no model owns in the storage dir, and removing it (`modeld prune`, POST /storage/prune).

Owned: each known model's files in `models/` (its file, partial, sidecar, held marker, import
leftovers: `Store.delete_model_files` removes exactly these; a split model's parts, each with
the same), its record in `custom/`, its pin in `pins/` and a Hub update's files in `updates/`
(its new file or a split set's parts, each with its partial and sidecar, and the journal of
its publish: actors/file_update.py; kept after a cancelled update for the next one). Stray:
files of models that are gone (a partial of a model whose record was removed by hand, a pin
of a deleted model), and temp files (`.<name>.<random>.tmp` or `.import`) untouched for an
hour, which no running write can still own (an upload that stalls is ended sooner).
Unreadable records in `custom/` are not strays: the log names them, and the operator decides.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs

from actors.spec import SPLIT_SUFFIX
from actors.store import OWNED_SUFFIXES

TEMP_AGE_SECONDS = 3600.0
_SUBDIRS = ("models", "pins", "updates")


@attrs.frozen
class Stray:
    path: Path
    bytes: int
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"path": str(self.path), "bytes": self.bytes, "reason": self.reason}


def _owner(name: str, subdir: str) -> str | None:
    """The model id a file name belongs to, or None for a name no model file has."""
    if subdir in ("pins", "updates") and name.endswith(".json"):
        return name[: -len(".json")]  # a pin; the journal of an update's publish
    for suffix in sorted(OWNED_SUFFIXES, key=len, reverse=True):
        stem = name[: len(name) - len(suffix)] if suffix else name
        if name.endswith(suffix) and stem.endswith(".gguf"):
            # A split model's parts (`<id>-0000k-of-0000n.gguf`, actors/split.py) are its own.
            return SPLIT_SUFFIX.sub("", stem[: -len(".gguf")])
    return None


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith((".tmp", ".import"))


def find_strays(root: Path, known_ids: Callable[[], Iterable[str]],
                now: float | None = None) -> list[Stray]:
    """The stray files under `root`. `known_ids` is called after the directories are listed,
    so a model created meanwhile owns the files it made (blocking; run in a thread)."""
    listed: list[tuple[Path, str, os.stat_result]] = []
    for subdir in _SUBDIRS:
        try:
            entries = list(os.scandir(root / subdir))
        except FileNotFoundError:
            continue
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                listed.append((Path(entry.path), subdir, st))
    known = set(known_ids())
    now = time.time() if now is None else now
    strays = []
    for path, subdir, st in listed:
        name = path.name
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        if _is_temp(name):
            if now - st.st_mtime >= TEMP_AGE_SECONDS:
                strays.append(Stray(path, size, "temp file untouched for an hour"))
            continue
        if stat.S_ISLNK(st.st_mode):
            strays.append(Stray(path, 0, "a link, which modeld never makes"))
            continue
        owner = _owner(name, subdir)
        if owner is None:
            strays.append(Stray(path, size, "no model file has this name"))
        elif owner not in known:
            strays.append(Stray(path, size, f"model {owner!r} no longer exists"))
    return sorted(strays, key=lambda s: str(s.path))


def remove_strays(strays: list[Stray]) -> list[Stray]:
    """Remove each stray (never following a link); the ones removed (blocking)."""
    removed = []
    for stray in strays:
        try:
            stray.path.unlink()
        except FileNotFoundError:
            continue
        removed.append(stray)
    return removed
