"""Disk admission in the model actor, on a fake free-space probe: a download whose known size
does not fit is refused with the numbers before anything is fetched or written."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from actors import messages as m
from actors.disk import DISK_MARGIN, check_fits
from actors.errors import InsufficientStorage
from actors.model import ActorSettings, ModelActor
from actors.partial import held_marker, partial_bytes
from actors.state import State
from actors.store import Store
from tests.actors.test_model_actor import (
    FakeFetch,
    FakeSpawner,
    RecordingGate,
    Rig,
    spec,
    write_partial,
)

pytestmark = pytest.mark.usefixtures("inline_threads")  # tests/actors/conftest.py


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "storage")


def test_the_margin_is_kept() -> None:
    check_fits(100, 100 + DISK_MARGIN, "a file")
    with pytest.raises(InsufficientStorage) as info:
        check_fits(101, 100 + DISK_MARGIN, "a file")
    assert "insufficient_storage" == info.value.code
    assert "(101 bytes)" in str(info.value) and f"({100 + DISK_MARGIN} bytes" in str(info.value)


@contextlib.asynccontextmanager
async def running(store: Store, gguf: bytes, size: int, free: list[int]) -> AsyncIterator[Rig]:
    fetch, spawn, gate = FakeFetch(gguf), FakeSpawner(), RecordingGate()
    probed: list[Path] = []

    def free_space(path: Path) -> int:
        probed.append(path)
        return free[0]

    actor = ModelActor(spec(size=size), store, settings=ActorSettings(), fetch=fetch,
                       spawn=spawn, gate=gate, free_space=free_space)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        yield Rig(actor=actor, store=store, fetch=fetch, spawn=spawn, gate=gate)
        assert probed and all(p == store.model_path("tiny").parent for p in probed)
        nursery.cancel_scope.cancel()


async def test_a_download_that_does_not_fit_is_refused_before_any_byte(
        autojump_clock: trio.abc.Clock, store: Store, gguf: bytes) -> None:
    free = [len(gguf) + DISK_MARGIN - 1]
    async with running(store, gguf, len(gguf), free) as rig:
        refused = await rig.refused(lambda r: m.StartDownload(reply=r))
        assert isinstance(refused, InsufficientStorage)
        assert f"({len(gguf)} bytes)" in str(refused)
        assert ([], State.ABSENT) == (rig.fetch.calls, rig.actor.state)
        assert not any(store.model_path("tiny").parent.iterdir())
        free[0] += 1  # just enough now
        view = await rig.view(lambda r: m.StartDownload(reply=r))
        assert State.DOWNLOADING == view.state


async def test_a_resumed_download_needs_only_what_is_left(
        autojump_clock: trio.abc.Clock, store: Store, gguf: bytes) -> None:
    dest = store.model_path("tiny")
    write_partial(dest, gguf, len(gguf) // 2)
    held = partial_bytes(dest)
    held_marker(dest).touch()  # a cancelled download, waiting for the user
    free = [len(gguf) - held + DISK_MARGIN]
    async with running(store, gguf, len(gguf), free) as rig:
        view = await rig.view(lambda r: m.StartDownload(reply=r))
        assert State.DOWNLOADING == view.state


async def test_a_running_download_reports_what_it_wrote(
        autojump_clock: trio.abc.Clock, store: Store, gguf: bytes) -> None:
    """partialBytes is what is on disk while the download runs, not what it started from."""
    async with running(store, gguf, len(gguf), [10**12]) as rig:
        assert 0 == (await rig.view(lambda r: m.StartDownload(reply=r))).partial_bytes
        await rig.fetch.started.wait()
        assert rig.fetch.half == (await rig.view()).partial_bytes
