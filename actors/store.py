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
    read_own,
    temp_name,
    write_atomic,
)
from actors.spec import ModelScore, ModelSpec, is_valid_id

log = structlog.get_logger("modeld.store")


class StoreError(Exception):
    pass


# What a model owns in models/ besides import leftovers: its file, the partial, the partial's
# sidecar (and the fixed-name temp older versions wrote it through), the marker of a partial
# that must not resume by itself.
OWNED_SUFFIXES = ("", ".partial", ".partial.json", ".partial.json.tmp", ".held")
SUBDIRS = ("models", "custom", "pins", "updates")  # updates/: actors/file_update.py
_UPLOAD_TEMP = re.compile(r"\.(.+)\.gguf\.[A-Za-z0-9_]{8}\.import")  # see `import_temp`


def record_to_json(spec: ModelSpec) -> bytes:
    data = attrs.asdict(spec)
    data["created"] = spec.created.isoformat()
    return json.dumps(data, indent=2, sort_keys=True).encode()


def record_from_json(raw: bytes) -> ModelSpec:
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
        """Create the layout if needed and check that only this user can change it (blocking;
        call before serving). Raises StoreError naming the path and the fix."""
        root = root.expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in (root, *(root / sub for sub in SUBDIRS)):
            if path.is_symlink() and not path.is_dir():  # models/ moved, its disk not mounted
                raise StoreError(f"{path} is a link to {os.readlink(path)}, which is not a "
                                 "directory; mount or fix it, or set [storage] dir instead")
            try:
                path.mkdir(exist_ok=True, mode=0o700)
                check_private_dir(path)
            except FileExistsError:
                raise StoreError(f"{path} is not a directory") from None
            except UnsafeDir as exc:
                raise StoreError(str(exc)) from None
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
        write_atomic(self.record_path(spec.id), record_to_json(spec))

    def delete_record(self, model_id: str) -> None:
        path = self.record_path(model_id)
        try:
            path.unlink()  # a link planted there is removed, never followed
        except FileNotFoundError:
            return
        fsync_dir(path.parent)

    def load_records(self) -> list[ModelSpec]:
        specs = []
        for path in sorted((self.root / "custom").glob("*.json")):
            try:
                spec = record_from_json(read_own(path))  # never through a link or a FIFO
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.error("record_unreadable", path=str(path), reason=str(exc))
                continue
            if path.stem != spec.id:
                log.error("record_unreadable", path=str(path), reason="file name and id differ")
                continue
            specs.append(spec)
        return specs

    def delete_model_files(self, model_id: str) -> None:
        """Remove exactly the files the model owns: the published file, the partial, its
        sidecar and held marker, and its import and sidecar-temp leftovers; never another
        model's (the files of model `a.gguf` start with the name of model `a`'s file)."""
        final = self.model_path(model_id)
        for suffix in OWNED_SUFFIXES:
            final.with_name(final.name + suffix).unlink(missing_ok=True)
        leftovers = (re.compile(rf"\.{re.escape(final.name)}\.[A-Za-z0-9_]{{8}}\.import"),
                     temp_name(final.name + ".partial.json"))
        for path in final.parent.glob(f".{final.name}.*"):
            if any(pattern.fullmatch(path.name) for pattern in leftovers):
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
        """Remove the temps a crash left. An upload's temp means its upload was cut: a model
        that only ever waited for that file (custom, no url, no source, no file) goes with it,
        as an import refused while the daemon runs leaves no record either."""
        cut: set[str] = set()
        for sub in ("models", "custom", "updates"):
            for path in (self.root / sub).glob(".*"):
                if path.suffix in (".tmp", ".import"):
                    path.unlink(missing_ok=True)
                    upload = _UPLOAD_TEMP.fullmatch(path.name)
                    if upload is not None and is_valid_id(upload[1]):
                        cut.add(upload[1])
        for model_id in sorted(cut):
            self._forget_cut_import(model_id)

    def _forget_cut_import(self, model_id: str) -> None:
        path = self.record_path(model_id)
        try:
            spec = record_from_json(read_own(path))
        except (OSError, ValueError, TypeError, KeyError):
            return  # no record (or not one to judge): load_records says so
        if spec.url is None and spec.source is None and not self.has_model_file(model_id):
            self.delete_record(model_id)
            log.warning("import_interrupted", model=model_id)
