"""A Hub update's publish (actors/file_update.py) cut short by a crash at every step: start-up
(`finish_interrupted`, as serve_registry runs it before reading records) finds either the old
files or the new ones whole at the final names, with the record that names them, never a mix
that looks published; for a split set of the same part count (the same final names), another
part count, a single file become a set and a set become a single file."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors import file_update, split
from actors.spec import ModelSpec, SplitPart
from actors.state import State
from actors.store import Store
from tests.actors.test_model_actor import FakeFetch
from tests.actors.test_supervision import running

MODEL_ID = "hf-up"
OLD, NEW = "a" * 40, "b" * 40


class Crash(BaseException):
    """The process dies here: nothing after it runs."""


def version(revision: str, count: int) -> tuple[ModelSpec, list[bytes]]:
    """A custom model at `revision` of `count` parts (0: one file), and their bytes."""
    tag = revision[0]
    blobs = [f"{tag}-{k}-".encode() * (10 + k) for k in range(1, max(count, 1) + 1)]
    digests = [hashlib.sha256(b).hexdigest() for b in blobs]
    parts = tuple(SplitPart(file=f"m-{k:05d}-of-{count:05d}.gguf", url=f"https://h/{tag}/{k}",
                            sha256=d, size=len(b))
                  for k, (b, d) in enumerate(zip(blobs, digests, strict=True), 1))
    spec = ModelSpec(id=MODEL_ID, name="Up", custom=True, url=f"https://h/{tag}/1",
                     sha256=digests[0], size=sum(map(len, blobs)), source="hf.co/u/r",
                     revision=revision, file="m.gguf", parts=parts if count else ())
    return spec, blobs


def write(paths: list[Path], blobs: list[bytes]) -> None:
    for path, blob in zip(paths, blobs, strict=True):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(blob)


def setup(root: Path, old_count: int, new_count: int) -> tuple[Store, ModelSpec, ModelSpec]:
    """The old version downloaded and recorded, the new one verified in updates/."""
    store = Store.open(root)
    (old, old_blobs), (new, new_blobs) = version(OLD, old_count), version(NEW, new_count)
    write(file_update.final_paths(store, old), old_blobs)
    store.write_record(old)
    write(file_update.staged_paths(store, new), new_blobs)
    return store, old, new


def judged(store: Store) -> tuple[str, bool, list[bytes], set[str]]:
    """What start-up concludes: the record's revision, whether its files look published, the
    bytes at its final names, and the model's names left in models/."""
    [spec] = store.load_records()
    paths = file_update.final_paths(store, spec)
    published = split.published(store, spec)
    return (spec.revision or "", published, [p.read_bytes() for p in paths] if published else [],
            {p.name for p in (store.root / "models").iterdir()})


@contextlib.contextmanager
def crash_at(step: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Die before the `step`th rename or unlink (0-based): the journal, each file, the record
    and each removal are one each."""
    done = 0
    real_replace, real_unlink = os.replace, Path.unlink

    def tick() -> None:
        nonlocal done
        if done == step:
            raise Crash
        done += 1

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        tick()
        real_replace(src, dst, **kw)

    def unlink(self: Path, missing_ok: bool = False) -> None:
        tick()
        real_unlink(self, missing_ok=missing_ok)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace)
        patch.setattr(Path, "unlink", unlink)
        yield


@pytest.mark.parametrize(("old_count", "new_count"), [(3, 3), (3, 2), (0, 3), (2, 0)])
def test_a_crash_at_any_step_leaves_one_whole_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old_count: int, new_count: int) -> None:
    versions = {OLD: version(OLD, old_count), NEW: version(NEW, new_count)}
    seen, step = set(), 0
    while True:
        store, old, new = setup(tmp_path / str(step), old_count, new_count)
        try:
            with crash_at(step, monkeypatch):
                file_update.publish(store, old, new, store.write_record)
            crashed = False
        except Crash:
            crashed = True
        journal = file_update.journal_path(store, MODEL_ID)
        if not journal.exists():  # nothing to finish: judged as it is
            revision, published, _, _ = judged(store)
            assert published and revision in (OLD, NEW), step
        file_update.finish_interrupted(store, store.write_record)
        revision, published, blobs, names = judged(store)
        spec, expected = versions[revision]
        assert (True, expected) == (published, blobs), step
        assert {p.name for p in file_update.final_paths(store, spec)} == names, step
        assert not journal.exists()
        if revision == NEW:
            assert [] == list((store.root / "updates").iterdir()), step
        seen.add(revision)
        if not crashed:
            break
        step += 1
    assert {OLD, NEW} == seen
    assert step >= 2 + max(new_count, 1)  # the journal and every file at least were a step


def test_a_new_file_gone_after_the_journal_leaves_nothing_published(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal written, one new part renamed, then a crash, and another new part removed
    by hand: neither set can be whole, so neither looks downloaded; the record names the new
    set, which a download fetches (checking any part left by its sha256)."""
    store, old, new = setup(tmp_path, 3, 3)
    with contextlib.suppress(Crash), crash_at(2, monkeypatch):
        file_update.publish(store, old, new, store.write_record)
    file_update.staged_paths(store, new)[2].unlink()  # the third part: not renamed yet
    file_update.finish_interrupted(store, store.write_record)
    assert (NEW, False) == judged(store)[:2]
    assert not split.published(store, old)
    assert not file_update.journal_path(store, MODEL_ID).exists()


def test_a_missing_new_file_changes_nothing(tmp_path: Path) -> None:
    store, old, new = setup(tmp_path, 3, 2)
    file_update.staged_paths(store, new)[0].unlink()
    with pytest.raises(file_update.UpdateLost):
        file_update.publish(store, old, new, store.write_record)
    assert (OLD, True) == judged(store)[:2]
    assert not file_update.journal_path(store, MODEL_ID).exists()


def test_an_unreadable_journal_leaves_nothing_published(tmp_path: Path) -> None:
    store = setup(tmp_path, 3, 3)[0]
    file_update.journal_path(store, MODEL_ID).write_text("{not json")
    file_update.finish_interrupted(store, store.write_record)
    assert (OLD, False) == judged(store)[:2]
    assert not file_update.journal_path(store, MODEL_ID).exists()


async def test_the_registry_finishes_a_publish_before_its_models_start(
        tmp_path: Path, gguf: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between the renames of a set of the same names: the daemon started again sees
    the new set, downloaded, with its revision (not the old record over a mix of parts)."""
    store, old, new = setup(tmp_path / "storage", 3, 3)
    with contextlib.suppress(Crash), crash_at(2, monkeypatch):  # part 2 renamed, not 3 nor 1
        file_update.publish(store, old, new, store.write_record)
    async with running(store, [], fetch=FakeFetch(gguf)) as registry:
        view = registry.view(MODEL_ID)
    assert (NEW, State.DOWNLOADED) == (view.spec.revision, view.state)
    assert (NEW, True, version(NEW, 3)[1]) == judged(store)[:3]


def test_an_update_clears_what_an_earlier_one_left_under_other_names(tmp_path: Path) -> None:
    store, _, new = setup(tmp_path, 3, 2)  # the update to 2 parts: its parts are in updates/
    updates = store.root / "updates"
    left = ["hf-up-00003-of-00003.gguf", "hf-up-00001-of-00003.gguf.partial",
            "hf-up-00001-of-00003.gguf.partial.json", "hf-up.gguf.partial", "hf-upper.gguf"]
    for name in left:
        (updates / name).write_bytes(b"x")
    (updates / "hf-up-00002-of-00002.gguf.partial").write_bytes(b"x")
    file_update.clear_others(store, new)
    assert ["hf-up-00001-of-00002.gguf", "hf-up-00002-of-00002.gguf",
            "hf-up-00002-of-00002.gguf.partial", "hf-upper.gguf"] == sorted(
        p.name for p in updates.iterdir())


def test_a_publish_failing_after_its_journal_keeps_the_update_for_start_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk error after the journal (here: the first rename of a new part): the update's
    files are not discarded, and start-up finishes the publish with them."""
    store, old, new = setup(tmp_path, 3, 3)
    real_replace, calls = os.replace, []

    def failing(src: Any, dst: Any, **kw: Any) -> None:
        calls.append(src)
        if len(calls) == 2:  # the journal's was the first
            raise OSError(5, "Input/output error")
        real_replace(src, dst, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", failing)
        with pytest.raises(OSError, match="Input/output"):
            file_update.publish(store, old, new, store.write_record)
    assert file_update.journal_path(store, MODEL_ID).exists()
    file_update.discard(store, new)  # what a failed update does: nothing while the journal is
    assert all(p.exists() for p in file_update.staged_paths(store, new))
    file_update.finish_interrupted(store, store.write_record)
    assert (NEW, True, version(NEW, 3)[1]) == judged(store)[:3]


def test_models_on_another_file_system_are_refused_before_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`models/` a link to another disk: a rename from updates/ cannot move the files, so the
    update is refused before anything changes."""
    store, old, new = setup(tmp_path, 0, 0)
    models = store.root / "models"
    real_stat = os.stat

    def elsewhere(path: Any, *args: Any, **kwargs: Any) -> Any:
        st = real_stat(path, *args, **kwargs)
        if Path(path) == models:
            fields = list(st)
            fields[2] += 1  # st_dev
            return os.stat_result(fields)
        return st

    monkeypatch.setattr(os, "stat", elsewhere)
    assert not file_update.one_file_system(store)
    with pytest.raises(file_update.UpdateLost, match="different file systems"):
        file_update.publish(store, old, new, store.write_record)
    monkeypatch.undo()
    assert (OLD, True) == judged(store)[:2]
    assert not file_update.journal_path(store, MODEL_ID).exists()
