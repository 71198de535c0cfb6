"""Publishing a Hub update's files (supervisor/hub_updates.py): one file or a whole split set,
downloaded and verified in `updates/`, becomes the model's with its new pin in one step, and a
crash at any moment leaves either the old files or the new ones, whole, at the final names,
with the record (or pin) that describes them.

    <dir>/updates/<id>.gguf                    the new file of an update, verified
    <dir>/updates/<id>-0000k-of-0000n.gguf     or the new set's parts (and their partials)
    <dir>/updates/<id>.json                    the journal of a publish under way

The journal is the commit point. Written (fsynced) only when every new file is verified in
`updates/`, it holds the new spec and the names of the old files. Then the new files are renamed
over the final names (a split set's parts 2..n, then the first), the record or pin is written,
the old files the new ones do not replace (another part count, a single file become a set)
are removed, and the journal last. Before the journal: nothing at the final names changed,
the old files and record stand. After it: start-up (`finish_interrupted`, before any record is
read or any model looks at its files) does the rest again, each step idempotent: a new file
still in `updates/` is renamed, one already renamed is at its final name (the same file: the
journal holds each new file's device and inode, which a rename keeps). A set whose final names
are the same in both versions is therefore never judged by `split.published` in the middle (old
and new parts mixed), and one whose names differ has both sets whole at once, the record naming
one of them. A publish that cannot finish (a new file gone, an unreadable journal) leaves no
first part at the final names: nothing looks downloaded, and the next download fetches the
set the record names, keeping the parts whose sha256 match. Everything here is blocking.
"""

from __future__ import annotations

import glob
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import structlog

from actors import split
from actors.safe_files import fsync_dir, read_own, write_atomic
from actors.spec import ModelSpec
from actors.store import OWNED_SUFFIXES, Store, record_from_json, record_to_json

log = structlog.get_logger("modeld.store")

Keep = Callable[[ModelSpec], None]  # writes a spec's record (custom) or pin (catalog)


class UpdateLost(OSError):
    """A new file is neither in `updates/` nor at its final name: the update cannot finish."""


def updates_dir(store: Store) -> Path:
    return store.root / "updates"


def staged_base(store: Store, model_id: str) -> Path:
    """Where an update's new file is downloaded (a split set's parts beside it)."""
    return updates_dir(store) / store.model_path(model_id).name


def staged_paths(store: Store, spec: ModelSpec) -> list[Path]:
    """The new files of an update to `spec`, in `updates/`, in part order."""
    base = staged_base(store, spec.id)
    return split.part_paths(store, spec, base) or [base]


def final_paths(store: Store, spec: ModelSpec) -> list[Path]:
    """The model's files at their final names, in part order."""
    return split.part_paths(store, spec) or [store.model_path(spec.id)]


CROSS_DEVICE = ("updates/ and models/ are on different file systems (models/ links to another "
                "disk), so new files cannot replace the old ones in one step; delete the model "
                "and download it again, or set [storage] dir to the other disk")


def one_file_system(store: Store) -> bool:
    """Whether an update's files (under the storage dir) can be renamed into `models/`."""
    return os.stat(store.root).st_dev == os.stat(store.root / "models").st_dev


def journal_path(store: Store, model_id: str) -> Path:
    return updates_dir(store) / f"{store.model_path(model_id).name.removesuffix('.gguf')}.json"


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _sizes(spec: ModelSpec) -> list[int | None]:
    return [p.size for p in spec.parts] if spec.parts else [spec.size]


def publish(store: Store, old: ModelSpec, new: ModelSpec, keep: Keep) -> None:
    """Make the verified new files of `new` in `updates/` the model's, with `keep(new)`, over
    the files of `old`. Raises UpdateLost (nothing changed) when a new file is missing, OSError
    from the steps after the journal (start-up finishes them)."""
    files = []
    for path, size in zip(staged_paths(store, new), _sizes(new), strict=True):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode) or size not in (None, st.st_size):
            raise UpdateLost(f"the update's file {path.name} is missing or incomplete")
        files.append((st.st_dev, st.st_ino))
    models = final_paths(store, new)[0].parent
    if os.stat(models).st_dev != files[0][0]:
        # `models/` links to another disk: a rename cannot move the files there in one step.
        raise UpdateLost(CROSS_DEVICE)
    journal = {"spec": json.loads(record_to_json(new)),
               "old": [p.name for p in final_paths(store, old)], "files": files}
    write_atomic(journal_path(store, new.id), json.dumps(journal, sort_keys=True).encode())
    _finish(store, new, journal["old"], files, keep)


def _finish(store: Store, new: ModelSpec, old_names: list[str],
            files: list[tuple[int, int]], keep: Keep) -> None:
    """The steps after the journal; each may have been done before. A new file no longer in
    `updates/` must be at its final name: the same file (device and inode: a rename keeps
    them), not an old one of the same name."""
    staged, final = staged_paths(store, new), final_paths(store, new)
    order = list(zip(staged, final, files, strict=True))
    for source, dest, identity in order[1:] + order[:1]:  # the first part, the set's, last
        if _is_regular(source):
            os.replace(source, dest)
        elif not _is_regular(dest) or _identity(dest) != tuple(identity):
            raise UpdateLost(f"the update's file {source.name} is gone")
    fsync_dir(final[0].parent)
    keep(new)
    kept = {p.name for p in final}
    models = final[0].parent
    gone = [models / name for name in old_names if name not in kept]
    for path in gone:  # an old set's first part (first in `old_names`) goes first
        for suffix in OWNED_SUFFIXES:
            path.with_name(path.name + suffix).unlink(missing_ok=True)
    for path in final:  # a partial left from before the old file was downloaded
        for suffix in OWNED_SUFFIXES[1:]:
            path.with_name(path.name + suffix).unlink(missing_ok=True)
    fsync_dir(models)
    journal_path(store, new.id).unlink(missing_ok=True)
    fsync_dir(updates_dir(store))


def _identity(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def _own_names(model_id: str) -> re.Pattern[str]:
    """The names of a model's files in `models/`: its file or a split set's parts."""
    return re.compile(rf"{re.escape(model_id)}(-\d{{5}}-of-\d{{5}})?\.gguf")


def finish_interrupted(store: Store, keep: Keep) -> list[str]:
    """At start-up, before records and pins are read: finish each publish a crash cut short
    (its journal is there); the ids finished. One that cannot finish (a new file gone) is
    made plainly not downloaded: its record names the new set, whose first part is removed,
    and the next download checks any part left by its sha256."""
    done = []
    for path in sorted(updates_dir(store).glob("*.json")):
        try:
            data = json.loads(read_own(path))
            new = record_from_json(json.dumps(data["spec"]).encode())
            old = [str(name) for name in data["old"]]
            files = [(int(dev), int(ino)) for dev, ino in data["files"]]
            if path != journal_path(store, new.id) or not all(
                    _own_names(new.id).fullmatch(name) for name in old):
                raise ValueError("names that are not the model's")
        except (OSError, ValueError, TypeError, KeyError) as exc:
            # Not one modeld wrote (it writes them whole): which files are whose is unknown,
            # so no first file of the model it names stays, and its files are downloaded again.
            log.error("hub_update_lost", model=path.stem, reason=f"unreadable journal: {exc}")
            models = store.root / "models"
            for first in [*models.glob(f"{glob.escape(path.stem)}.gguf"),
                          *models.glob(f"{glob.escape(path.stem)}-00001-of-*.gguf")]:
                first.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            continue
        try:
            _finish(store, new, old, files, keep)
        except (OSError, ValueError) as exc:  # UpdateLost, or a disk that refuses the record
            log.error("hub_update_lost", model=new.id, reason=str(exc))
            _give_up(store, new, old, keep, path)
            continue
        log.info("hub_update_finished", model=new.id, revision=new.revision, file=new.file)
        done.append(new.id)
    return done


def _give_up(store: Store, new: ModelSpec, old: list[str], keep: Keep, journal: Path) -> None:
    """Neither set can be whole: no first part stays, so nothing looks downloaded."""
    for name in [final_paths(store, new)[0].name, *old[:1]]:
        (store.root / "models" / name).unlink(missing_ok=True)
    fsync_dir(store.root / "models")
    try:
        keep(new)
    except OSError:
        pass  # the old record names a set without its first part: not downloaded either
    journal.unlink(missing_ok=True)


def clear_others(store: Store, spec: ModelSpec) -> None:
    """Before an update to `spec` downloads: remove what an earlier, cancelled update of the
    model left in `updates/` under other names (another part count, one file instead of a
    set); what has this update's names is kept, checked again by its sha256."""
    ours = {p.name for p in staged_paths(store, spec)}
    own = _own_names(spec.id)
    try:
        entries = list(os.scandir(updates_dir(store)))
    except FileNotFoundError:
        return
    for entry in entries:
        base = next((entry.name.removesuffix(sfx) for sfx in OWNED_SUFFIXES[1:]
                     if entry.name.endswith(sfx)), entry.name)
        if own.fullmatch(base) and base not in ours:
            Path(entry.path).unlink(missing_ok=True)


def discard(store: Store, spec: ModelSpec) -> None:
    """Remove what an update to `spec` left in `updates/`: its files, partials and sidecars;
    nothing while its journal stands (start-up finishes that publish with them)."""
    if journal_path(store, spec.id).exists():
        return
    for path in staged_paths(store, spec):
        for suffix in OWNED_SUFFIXES:
            path.with_name(path.name + suffix).unlink(missing_ok=True)
