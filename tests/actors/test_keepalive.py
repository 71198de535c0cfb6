"""Keep-alive: durations, and a model actor that unloads an idle model when its keep-alive runs
out (never while a request uses it), on the autojump clock."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog.testing
import trio

from actors import messages as m
from actors.errors import ModelError
from actors.generation import GenerationStream
from actors.keepalive import (
    DEFAULT,
    FIRST_USE_GRACE,
    FOREVER,
    KeepAliveArg,
    parse_keep_alive,
)
from actors.model import ActorSettings, ModelActor
from actors.state import State
from actors.store import Store
from actors.worker import GenerateParams
from tests.actors.test_model_actor import (
    FakeFetch,
    FakeSpawner,
    RecordingGate,
    Rig,
    published,
    spec,
)

pytestmark = pytest.mark.usefixtures("inline_threads")  # tests/actors/conftest.py

KEEP = 60.0  # [runtime] keep_alive of these actors


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "storage")


@pytest.mark.parametrize(("text", "seconds"), [
    ("15m", 900.0), ("30s", 30.0), ("1h30m", 5400.0), ("500ms", 0.5), ("2d", 172800.0),
    ("0", 0.0), (0, 0.0), (90, 90.0), (2.5, 2.5), ("-1", FOREVER), (-1, FOREVER),
    ("-5m", FOREVER), ("forever", FOREVER), (" 10S ", 10.0),
])
def test_durations(text: object, seconds: float) -> None:
    assert seconds == parse_keep_alive(text)


@pytest.mark.parametrize("bad", ["", "m", "15x", "1.2.3s", "soon", True, None, [], "nan"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_keep_alive(bad)


@contextlib.asynccontextmanager
async def running(store: Store, gguf: bytes, model_keep: str | None = None
                  ) -> AsyncIterator[Rig]:
    published(store, gguf)
    fetch, spawn, gate = FakeFetch(gguf), FakeSpawner(), RecordingGate()
    actor = ModelActor(spec(keep_alive=model_keep), store,
                       settings=ActorSettings(keep_alive=KEEP), fetch=fetch, spawn=spawn,
                       gate=gate)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        yield Rig(actor=actor, store=store, fetch=fetch, spawn=spawn, gate=gate)
        nursery.cancel_scope.cancel()


async def generate(rig: Rig, keep_alive: KeepAliveArg = DEFAULT) -> GenerationStream:
    send, recv = trio.open_memory_channel[GenerationStream | ModelError](1)
    await rig.actor.mailbox.send(m.Generate(prompt="Hi", params=GenerateParams(max_new_tokens=2),
                                            reply=send, keep_alive=keep_alive))
    async with recv:
        stream = await recv.receive()
    assert isinstance(stream, GenerationStream), stream
    return stream


async def test_a_model_loaded_on_first_use_is_unloaded_after_its_keep_alive(
        autojump_clock: trio.abc.Clock, store: Store, gguf: bytes) -> None:
    async with running(store, gguf) as rig:
        with structlog.testing.capture_logs() as logs:
            view = await rig.view(lambda r: m.Load(reply=r, keep_alive=DEFAULT))
            assert (State.LOADED, KEEP, 0) == (view.state, view.keep_alive, view.busy)
            assert view.expires_at is not None and view.idle_since is not None
            assert KEEP == pytest.approx(view.expires_at - view.idle_since)
            await trio.sleep(KEEP - 1)
            assert State.LOADED == rig.actor.state
            await trio.sleep(2)
            assert State.DOWNLOADED == rig.actor.state
        assert rig.spawn.workers[0].closed.is_set()
        assert [{"event": "model_expired", "model": "tiny", "keep_alive": KEEP,
                 "log_level": "info"}] == [e for e in logs if e["event"] == "model_expired"]
        assert ("release", "tiny") == rig.gate.calls[-1]


async def test_the_models_own_keep_alive_wins_over_the_default(
        autojump_clock: trio.abc.Clock, store: Store, gguf: bytes) -> None:
    async with running(store, gguf, model_keep="5m") as rig:
        await rig.view(lambda r: m.Load(reply=r, keep_alive=DEFAULT))
        await trio.sleep(299)
        assert State.LOADED == rig.actor.state
        await trio.sleep(2)
        assert State.DOWNLOADED == rig.actor.state


async def test_an_explicit_load_stays_until_unloaded(
        autojump_clock: trio.abc.Clock, store: Store, gguf: bytes) -> None:
    async with running(store, gguf) as rig:
        view = await rig.view(lambda r: m.Load(reply=r))  # the API's explicit load
        assert (None, None) == (view.keep_alive, view.expires_at)
        async with await generate(rig) as stream:  # a request without keep_alive: no change
            async for _piece in stream:
                pass
        await trio.sleep(10 * 3600)
        assert State.LOADED == rig.actor.state
        # A load on first use of a model loaded explicitly does not shorten its stay.
        view = await rig.view(lambda r: m.Load(reply=r, keep_alive=DEFAULT))
        assert view.expires_at is None
        # An explicit load that gives a keep-alive sets it.
        view = await rig.view(lambda r: m.Load(reply=r, keep_alive=30.0))
        assert 30.0 == view.keep_alive
        await trio.sleep(31)
        assert State.DOWNLOADED == rig.actor.state


async def test_a_model_in_use_never_expires(
        autojump_clock: trio.abc.Clock, store: Store, gguf: bytes) -> None:
    async with running(store, gguf) as rig:
        await rig.view(lambda r: m.Load(reply=r, keep_alive=DEFAULT))
        stream = await generate(rig)
        view = await rig.view()
        assert (1, None, None) == (view.busy, view.expires_at, view.idle_since)
        await trio.sleep(10 * KEEP)  # a long generation (or a slow reader)
        assert State.LOADED == rig.actor.state
        # Not evicted either: its actor refuses an eviction while it is in use.
        refused = await rig.refused(lambda r: m.Unload(reply=r, if_idle=True))
        assert "busy" == refused.code
        await stream.aclose()
        view = await rig.view()
        assert 0 == view.busy and view.expires_at is not None
        await trio.sleep(KEEP - 1)
        assert State.LOADED == rig.actor.state
        await trio.sleep(2)
        assert State.DOWNLOADED == rig.actor.state


async def test_a_requests_keep_alive_zero_unloads_after_it(
        autojump_clock: trio.abc.Clock, store: Store, gguf: bytes) -> None:
    async with running(store, gguf) as rig:
        await rig.view(lambda r: m.Load(reply=r, keep_alive=DEFAULT))
        first = await generate(rig, keep_alive=0.0)
        second = await generate(rig)  # two at once: the model waits for both
        await first.aclose()
        await trio.sleep(1)
        assert State.LOADED == rig.actor.state
        await second.aclose()
        await trio.sleep(0.001)
        assert State.DOWNLOADED == rig.actor.state


async def test_a_fresh_load_waits_for_its_first_request(
        autojump_clock: trio.abc.Clock, store: Store, gguf: bytes) -> None:
    async with running(store, gguf, model_keep="0") as rig:
        await rig.view(lambda r: m.Load(reply=r, keep_alive=DEFAULT))
        await trio.sleep(FIRST_USE_GRACE - 1)  # the request that loaded it is on its way
        assert State.LOADED == rig.actor.state
        await (await generate(rig)).aclose()
        await trio.sleep(0.001)
        assert State.DOWNLOADED == rig.actor.state
        # Never used at all: unloaded after the grace.
        await rig.view(lambda r: m.Load(reply=r, keep_alive=DEFAULT))
        await trio.sleep(FIRST_USE_GRACE + 1)
        assert State.DOWNLOADED == rig.actor.state


async def test_a_requests_keep_alive_forever_keeps_it(
        autojump_clock: trio.abc.Clock, store: Store, gguf: bytes) -> None:
    async with running(store, gguf) as rig:
        await rig.view(lambda r: m.Load(reply=r, keep_alive=DEFAULT))
        await (await generate(rig, keep_alive=FOREVER)).aclose()
        await trio.sleep(10 * 3600)
        view = await rig.view()
        assert (State.LOADED, None, None) == (view.state, view.keep_alive, view.expires_at)


async def test_a_request_that_outlives_its_worker_ends_harmlessly(
        autojump_clock: trio.abc.Clock, store: Store, gguf: bytes) -> None:
    async with running(store, gguf) as rig:
        await rig.view(lambda r: m.Load(reply=r, keep_alive=DEFAULT))
        old = await generate(rig)
        await rig.view(lambda r: m.Unload(reply=r))
        await rig.view(lambda r: m.Load(reply=r, keep_alive=DEFAULT))
        current = await generate(rig)
        await old.aclose()  # from the first load: does not end the current request's use
        assert 1 == (await rig.view()).busy
        await current.aclose()
        assert 0 == (await rig.view()).busy
