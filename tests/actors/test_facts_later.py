"""Start-up never waits on a stored file's header: an actor serves first, and the file's facts
arrive once read (real threads here, unlike test_model_actor's inline ones)."""

from __future__ import annotations

import threading
from pathlib import Path

import trio

from actors import messages as m
from actors.gguf import GGUFInfo, inspect_gguf
from actors.model import ActorSettings, ModelActor
from actors.spec import ModelSpec
from actors.state import State
from actors.store import Store
from tests.actors.gates import OpenGate
from tests.gguf_factory import write_tiny_llama


async def _never_fetch(*_args: object) -> None:
    raise AssertionError("no download here")


async def _never_spawn(*_args: object) -> None:
    raise AssertionError("no worker here")


async def snapshot(actor: ModelActor) -> m.ModelView:
    send, recv = trio.open_memory_channel[m.Reply](1)
    await actor.mailbox.send(m.GetSnapshot(reply=send))
    async with recv:
        reply = await recv.receive()
    assert isinstance(reply, m.ModelView), reply
    return reply


async def test_actor_serves_before_its_files_header_is_read(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "storage")
    write_tiny_llama(store.model_path("tiny"))
    release = threading.Event()

    def slow_inspect(path: Path) -> GGUFInfo:
        release.wait(10)  # a header that takes its time (the test lets it go)
        return inspect_gguf(path)

    actor = ModelActor(ModelSpec(id="tiny", name="Tiny"), store, settings=ActorSettings(),
                       fetch=_never_fetch, spawn=_never_spawn,  # type: ignore[arg-type]
                       gate=OpenGate(), inspect=slow_inspect)
    try:
        with trio.fail_after(8):
            async with trio.open_nursery() as nursery:
                await nursery.start(actor.run)
                first = await snapshot(actor)
                assert State.DOWNLOADED == first.state
                assert first.facts is None
                release.set()
                view = first
                while view.facts is None:  # the facts arrive as a message, soon
                    await trio.sleep(0.01)
                    view = await snapshot(actor)
                assert "llama" == view.facts.architecture
                nursery.cancel_scope.cancel()
    finally:
        release.set()
