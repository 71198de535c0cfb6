"""On-disk layout of the storage dir, and the only code that writes records.

    <dir>/models/<id>.gguf              published model files: complete and verified
    <dir>/models/<id>-0000k-of-0000n.gguf   a split model's parts instead (actors/split.py)
    <dir>/models/<id>.gguf.partial      a download in progress (and its .partial.json sidecar)
    <dir>/custom/<id>.json              custom model records

Paths are built only from validated ids and checked to resolve under the storage dir.
Every write that must survive a crash is: temp file, fsync, rename, fsync of the directory.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

import attrs
import structlog

from actors.safe_files import (
    UnsafeDir,
    check_private_dir,
    fsync_dir,
    open_own,
    write_new_then_rename,
)
from actors.spec import ModelScore, ModelSpec, is_valid_id

log = structlog.get_logger("modeld.store")


class StoreError(Exception):
    pass


# What a model owns in models/ besides import leftovers: its file, the partial, the partial's
# sidecar (and that sidecar's temp), the marker of a partial that must not resume by itself.
OWNED_SUFFIXES = ("", ".partial", ".partial.json", ".partial.json.tmp", ".held")


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old or the new content."""
    write_new_then_rename(path, data)


def _record_to_json(spec: ModelSpec) -> bytes:
    data = attrs.asdict(spec)
    data["created"] = spec.created.isoformat()
    return json.dumps(data, indent=2, sort_keys=True).encode()


def _record_from_json(raw: bytes) -> ModelSpec:
    data: dict[str, Any] = json.loads(raw)
    data["created"] = dt.datetime.fromisoformat(data["created"])
    data["score"] = ModelScore(**data.get("score", {}))  # records before scores have none
    spec = ModelSpec(**data)
    if not is_valid_id(spec.id):
        raise ValueError(f"invalid id {spec.id!r}")
    return spec


@attrs.frozen
class Store:
    root: Path

    @classmethod
    def open(cls, root: Path) -> Store:
        """Create the layout if needed (blocking; call before serving)."""
        root = root.expanduser().resolve()
        for sub in ("models", "custom"):
            (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in (root, root / "models", root / "custom", root / "pins"):
            try:
                if path.exists():
                    check_private_dir(path)
            except UnsafeDir as exc:
                raise StoreError(f"the storage dir is not safe to use: {exc}") from None
        store = cls(root)
        store._remove_stale_temps()
        return store

    def _inside(self, path: Path) -> Path:
        """`path` when it names an entry of `models/` or `custom/`. The name itself may be a link
        (planted by someone else): it then counts as no file (`has_model_file`), is replaced
        on publish and removed on delete, and is never followed."""
        # `models/` and `custom/` may themselves be links (models moved to a bigger disk is
        # the operator's choice); what a model id names never leaves them.
        if path.parent not in (self.root / "models", self.root / "custom") or path.name in (
            "", ".", "..",
        ):
            raise StoreError(f"{path} leaves the storage dir")
        return path

    def _checked_id(self, model_id: str) -> str:
        if not is_valid_id(model_id):
            raise StoreError(f"invalid model id {model_id!r}")
        return model_id

    def model_path(self, model_id: str) -> Path:
        return self._inside(self.root / "models" / f"{self._checked_id(model_id)}.gguf")

    def record_path(self, model_id: str) -> Path:
        return self._inside(self.root / "custom" / f"{self._checked_id(model_id)}.json")

    def has_model_file(self, model_id: str) -> bool:
        """A regular file (never a link) at the model's final path."""
        try:
            return stat.S_ISREG(os.lstat(self.model_path(model_id)).st_mode)
        except FileNotFoundError:
            return False

    def write_record(self, spec: ModelSpec) -> None:
        write_atomic(self.record_path(spec.id), _record_to_json(spec))

    def delete_record(self, model_id: str) -> None:
        path = self.record_path(model_id)
        if path.exists():
            path.unlink()
            fsync_dir(path.parent)

    def load_records(self) -> list[ModelSpec]:
        specs = []
        for path in sorted((self.root / "custom").glob("*.json")):
            try:
                spec = _record_from_json(path.read_bytes())
            except (ValueError, TypeError, KeyError) as exc:
                log.error("record_unreadable", path=str(path), reason=str(exc))
                continue
            if path.stem != spec.id:
                log.error("record_unreadable", path=str(path), reason="file name and id differ")
                continue
            specs.append(spec)
        return specs

    def delete_model_files(self, model_id: str) -> None:
        """Remove exactly the files the model owns: the published file, the partial, its
        sidecar and held marker, and its import leftovers; never another model's (the files of
        model `a.gguf` start with the name of model `a`'s file)."""
        final = self.model_path(model_id)
        for suffix in OWNED_SUFFIXES:
            final.with_name(final.name + suffix).unlink(missing_ok=True)
        leftover = re.compile(rf"\.{re.escape(final.name)}\.[A-Za-z0-9_]{{8}}\.import")
        for path in final.parent.glob(f".{final.name}.*.import"):
            if leftover.fullmatch(path.name):
                path.unlink(missing_ok=True)
        fsync_dir(final.parent)

    def import_temp(self, model_id: str) -> Path:
        """A fresh temp path next to the final file, for an upload being received."""
        final = self.model_path(model_id)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".import", dir=final.parent)
        os.close(fd)
        return Path(tmp)

    def publish(self, temp: Path, model_id: str) -> Path:
        """fsync `temp`, rename it onto the final path and fsync the directory."""
        final = self.model_path(model_id)
        fd = open_own(temp, os.O_RDONLY, create=False)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, final)
        fsync_dir(final.parent)
        return final

    def _remove_stale_temps(self) -> None:
        for sub in ("models", "custom"):
            for path in (self.root / sub).glob(".*"):
                if path.suffix in (".tmp", ".import"):
                    path.unlink(missing_ok=True)
