"""A split GGUF model's actor (actors/split.py) on virtual time, with a real Store and a fake
fetcher: the parts' names, their download and publish order (the first part last), one progress
over the set, and what a crash at any point leaves: nothing that looks downloaded, and a
resume that keeps the parts already verified."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio

from actors import messages as m
from actors import split
from actors.download import DownloadRequest, OriginUnreachable, ProgressSink
from actors.errors import Conflict
from actors.model import ActorSettings, ModelActor
from actors.partial import Sidecar, partial_path, write_sidecar
from actors.spec import ModelSpec, SplitPart, is_valid_id
from actors.state import State
from actors.store import Store
from supervisor.pins import apply_pins, write_pin
from tests.actors.gates import OpenGate
from tests.gguf_factory import split_gguf, write_tiny_llama

T = TypeVar("T")
# Blocking store work runs inline (tests/actors/conftest.py), in step with the clock.
pytestmark = pytest.mark.usefixtures("inline_threads")
MODEL_ID = "big"


@pytest.fixture
def parts(tmp_path: Path) -> list[bytes]:
    return split_gguf(write_tiny_llama(tmp_path / "whole.gguf", seed=2), 3)


def split_spec(parts: list[bytes]) -> ModelSpec:
    items = tuple(SplitPart(file=f"m-{k:05d}-of-00003.gguf", url=f"https://cdn.test/{k}",
                            sha256=hashlib.sha256(data).hexdigest(), size=len(data))
                  for k, data in enumerate(parts, 1))
    return ModelSpec(id=MODEL_ID, name="big", url=items[0].url, sha256=items[0].sha256,
                     size=sum(map(len, parts)), custom=True, file=items[0].file, parts=items)


class PartFetch:
    """Serves each part by its url: half of it as a partial, a virtual second, then the whole
    part published at its dest; `hang` (a url) stops there for good, `fail` raises."""

    def __init__(self, store: Store, spec: ModelSpec, parts: list[bytes]) -> None:
        self.store, self.spec = store, spec
        self.data = {p.url: d for p, d in zip(spec.parts, parts, strict=True)}
        self.order: list[str] = []
        self.seen: list[tuple[int, int | None]] = []  # the model's progress after each update
        self.published_early = False
        self.hang: str | None = None
        self.fail: str | None = None
        self.progress: Any = None
        self.hung = trio.Event()

    async def __call__(self, req: DownloadRequest, sink: ProgressSink) -> None:
        self.order.append(req.dest.name)
        data = self.data[req.url]
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (req.sha256, req.size)
        # Only the first part holds the model's keys: the others are not `inspect`ed.
        assert (req.verify is not None) == req.dest.name.endswith("-00001-of-00003.gguf")
        self.published_early |= split.published(self.store, self.spec)
        half = len(data) // 2
        partial_path(req.dest).write_bytes(data[:half])
        write_sidecar(req.dest, Sidecar(req.url, '"e"', None, len(data), [(0, half)]))
        sink.update(half, len(data))
        self.seen.append((self.progress.value.bytes, self.progress.value.total))
        await trio.sleep(1)
        if req.url == self.hang:
            self.hung.set()
            await trio.sleep_forever()
        if req.url == self.fail:
            raise OriginUnreachable("the CDN is gone")
        req.dest.write_bytes(data)
        partial_path(req.dest).unlink()


@asynccontextmanager
async def running(store: Store, spec: ModelSpec, fetch: PartFetch) -> AsyncIterator[ModelActor]:
    async def spawn(path: Path, spec: ModelSpec, chat_template: str | None) -> Any:
        raise AssertionError("no load here")

    actor = ModelActor(spec, store, settings=ActorSettings(), fetch=fetch, spawn=spawn,
                       gate=OpenGate())
    fetch.progress = actor.progress
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            yield actor
            nursery.cancel_scope.cancel()


async def call(actor: ModelActor, make: Callable[[Any], m.Command]) -> Any:
    send, receive = trio.open_memory_channel[Any](1)
    await actor.mailbox.send(make(send))
    return await receive.receive()


async def settled(actor: ModelActor) -> None:
    """Until the download in progress ends (its terminal progress)."""
    async for progress in actor.progress.subscribe():
        if progress.terminal and actor.state is not State.DOWNLOADING:
            return


def test_part_names(tmp_path: Path) -> None:
    base = tmp_path / "models" / "x.gguf"
    assert "x-00002-of-00010.gguf" == split.part_path(base, 2, 10).name
    # No model id may end like a part, so no model's file is another's part.
    assert not is_valid_id("x-00001-of-00003")
    assert is_valid_id("x-00001-of-003")


async def test_parts_in_order_first_last_progress_over_the_set(
        tmp_path: Path, parts: list[bytes], autojump_clock: Any) -> None:
    store = Store.open(tmp_path / "s")
    spec = split_spec(parts)
    fetch = PartFetch(store, spec, parts)
    total = sum(map(len, parts))
    async with running(store, spec, fetch) as actor:
        await call(actor, lambda r: m.StartDownload(reply=r))
        await settled(actor)
        assert State.DOWNLOADED is actor.state
        assert [f"{MODEL_ID}-{k:05d}-of-00003.gguf" for k in (2, 3, 1)] == fetch.order
        assert not fetch.published_early
        sizes = [len(p) for p in parts]
        assert [(sizes[1] // 2, total), (sizes[1] + sizes[2] // 2, total),
                (sizes[1] + sizes[2] + sizes[0] // 2, total)] == fetch.seen
        done = actor.progress.value
        assert ("COMPLETED", total, total) == (done.status, done.bytes, done.total)
        view = actor.view()
        assert view.facts is not None and total == view.facts.size
        assert "llama.cpp" == view.runtime
        assert parts == [p.read_bytes() for p in split.part_paths(store, spec)]
        assert not store.model_path(MODEL_ID).exists()

        # An upload is one file: a split model takes none.
        refused = await call(actor, lambda r: m.ImportFile(reply=r, temp=tmp_path / "t",
                                                              sha256=spec.sha256 or ""))
        assert isinstance(refused, Conflict) and "split_import_unsupported" == refused.code

        await call(actor, lambda r: m.Delete(reply=r))
        assert State.ABSENT is actor.state
        assert [] == list((tmp_path / "s" / "models").iterdir())


async def test_crash_leaves_nothing_published_and_resume_keeps_verified_parts(
        tmp_path: Path, parts: list[bytes], autojump_clock: Any) -> None:
    store = Store.open(tmp_path / "s")
    spec = split_spec(parts)
    fetch = PartFetch(store, spec, parts)
    fetch.hang = spec.parts[2].url  # part 2 is in, part 3 half: then the daemon dies
    async with running(store, spec, fetch) as actor:
        await call(actor, lambda r: m.StartDownload(reply=r))
        await fetch.hung.wait()
    paths = split.part_paths(store, spec)
    assert (False, True, False) == tuple(p.exists() for p in paths)
    assert not split.published(store, spec)

    # Started again: not downloaded, the download resumes by itself, part 2 is kept.
    again = PartFetch(store, spec, parts)
    async with running(store, spec, again) as actor:
        assert len(parts[1]) + len(parts[2]) // 2 == actor.view().partial_bytes
        await settled(actor)
        assert State.DOWNLOADED is actor.state
        assert [paths[2].name, paths[0].name] == again.order

    # A part left at its final name from another version is not trusted: fetched again.
    paths[0].unlink()
    paths[1].write_bytes(b"\0" * len(parts[1]))
    fetch = PartFetch(store, spec, parts)
    fetch.fail = spec.parts[0].url
    async with running(store, spec, fetch) as actor:  # resumes by itself again
        await settled(actor)
        assert [paths[1].name, paths[0].name] == fetch.order  # part 3 kept
        assert State.ABSENT is actor.state and "CDN is gone" in (actor.error or "")
        assert parts[1] == paths[1].read_bytes()
        assert not split.published(store, spec)


def test_parts_kept_in_the_record_and_the_pin(tmp_path: Path, parts: list[bytes]) -> None:
    """A custom split model's record and a catalog one's pin keep every part across restarts."""
    store = Store.open(tmp_path / "s")
    spec = attrs.evolve(split_spec(parts), source="hf.co/u/r:Q8_0", revision="c" * 40)
    store.write_record(spec)
    assert [spec] == store.load_records()
    write_pin(store.root, spec)
    catalog = ModelSpec(id=MODEL_ID, name="big", source="hf.co/u/r:Q8_0")
    assert spec.parts == apply_pins(store.root, [catalog])[0].parts


def test_a_token_goes_only_to_parts_at_its_origin(tmp_path: Path, parts: list[bytes]) -> None:
    store = Store.open(tmp_path / "s")
    spec = split_spec(parts)
    elsewhere = attrs.evolve(spec.parts[2], url="https://mirror.test/3")
    spec = attrs.evolve(spec, parts=(*spec.parts[:2], elsewhere))
    token = (("Authorization", "Bearer hf_secret"),)
    template = DownloadRequest(url=spec.parts[0].url, dest=store.model_path(MODEL_ID),
                               headers=token)
    sent = {part.url: request.headers
            for request, part, _ in split.part_requests(store, spec, template)}
    assert {"https://cdn.test/1": token, "https://cdn.test/2": token,
            "https://mirror.test/3": ()} == sent
