"""A hypothesis state machine drives a real ModelActor (real Store on disk; a fake fetcher and
fake workers) with random interleavings of download, finish, fail, cancel, load, unload, worker
death, update, delete and restart. After every step the actor's state must match a small model
of the contract, and the three wire booleans must agree with it and with the files on disk."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from actors import messages as m
from actors.download import DownloadRequest, OriginUnreachable, ProgressSink
from actors.errors import Conflict
from actors.model import ActorSettings, ModelActor
from actors.partial import remove_partial
from actors.spec import ModelSpec
from actors.state import State
from actors.store import Store
from tests.actors.gates import OpenGate
from tests.actors.test_model_actor import FakeSpawner, check_consistent, write_partial
from tests.gguf_factory import write_tiny_llama

T = TypeVar("T")
MODEL_ID = "machine-model"
URL = "https://models.test/machine.gguf"
WAIT = 10.0


class Portal:
    """A trio loop in a thread, for a synchronous state machine to call into."""

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        self._ready.wait(10)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        assert self._token is not None
        return trio.from_thread.run(fn, trio_token=self._token)

    def close(self) -> None:
        assert self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)


class SteppedFetch:
    """A download that writes half the file, then waits for the machine to finish or fail it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.outcome: trio.MemorySendChannel[str] | None = None

    async def __call__(self, req: DownloadRequest, sink: ProgressSink) -> None:
        send, recv = trio.open_memory_channel[str](1)
        self.outcome = send
        write_partial(req.dest, self.data, len(self.data) // 2)
        sink.update(len(self.data) // 2, len(self.data))
        async with recv:
            verdict = await recv.receive()
        if verdict == "fail":
            raise OriginUnreachable("the origin went away")
        req.dest.write_bytes(self.data)
        remove_partial(req.dest)


@attrs.define
class Expected:
    state: State = State.ABSENT
    description: str = "start"


class ActorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="modeld-machine-"))
        self.store = Store.open(self.tmp / "storage")
        self.data = write_tiny_llama(self.tmp / "source.gguf", seed=7).read_bytes()
        self.spec = ModelSpec(id=MODEL_ID, name="Machine", url=URL, custom=True,
                              description="start")
        self.store.write_record(self.spec)
        self.fetch = SteppedFetch(self.data)
        self.spawn = FakeSpawner()
        self.portal = Portal()
        self.expected = Expected()
        self.scope: trio.CancelScope | None = None
        self.actor: ModelActor | None = None
        self._start_actor()

    # -- plumbing ----------------------------------------------------------------------------

    def _start_actor(self) -> None:
        actor = ModelActor(self.spec, self.store, settings=ActorSettings(), fetch=self.fetch,
                           spawn=self.spawn, gate=OpenGate())
        scope = trio.CancelScope()
        stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await actor.run(task_status=task_status)
            finally:
                stopped.set()

        async def start() -> None:
            await self.portal.nursery.start(run)

        self.portal.run(start)
        self.actor, self.scope, self._stopped = actor, scope, stopped

    def _stop_actor(self) -> None:
        assert self.scope is not None
        scope, stopped = self.scope, self._stopped

        async def stop() -> None:
            scope.cancel()
            with trio.fail_after(WAIT):
                await stopped.wait()

        self.portal.run(stop)

    def ask(self, make: Callable[[trio.MemorySendChannel[m.Reply]], m.Command]) -> m.Reply:
        actor = self.actor
        assert actor is not None

        async def call() -> m.Reply:
            send, recv = trio.open_memory_channel[m.Reply](1)
            with trio.fail_after(WAIT):
                await actor.mailbox.send(make(send))
                async with recv:
                    return await recv.receive()

        return self.portal.run(call)

    def view(self) -> m.ModelView:
        reply = self.ask(lambda r: m.GetSnapshot(reply=r))
        assert isinstance(reply, m.ModelView)
        return reply

    def wait_for(self, state: State) -> None:
        """Until the actor's own messages (a download's end, a worker's exit) are handled."""
        actor = self.actor
        assert actor is not None

        async def poll() -> None:
            with trio.fail_after(WAIT):
                # The actor has no state-change hook (nothing but tests would use one).
                while actor.state is not state:  # noqa: ASYNC110
                    await trio.sleep(0.001)

        self.portal.run(poll)

    def wait_fetch_started(self) -> None:
        async def poll() -> None:
            with trio.fail_after(WAIT):
                while self.fetch.outcome is None:  # noqa: ASYNC110
                    await trio.sleep(0.001)

        self.portal.run(poll)

    def teardown(self) -> None:
        try:
            self._stop_actor()
        finally:
            self.portal.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- rules -------------------------------------------------------------------------------

    @rule()
    def download(self) -> None:
        if self.expected.state is State.ABSENT:
            self.fetch.outcome = None
        reply = self.ask(lambda r: m.StartDownload(reply=r))
        assert isinstance(reply, m.ModelView)
        if self.expected.state is State.ABSENT:
            self.expected.state = State.DOWNLOADING
            self.wait_fetch_started()

    @precondition(lambda self: self.expected.state is State.DOWNLOADING)
    @rule(verdict=st.sampled_from(["ok", "fail"]))
    def end_download(self, verdict: str) -> None:
        self.wait_fetch_started()
        outcome = self.fetch.outcome
        assert outcome is not None
        self.portal.run(lambda: outcome.send(verdict))
        self.expected.state = State.DOWNLOADED if verdict == "ok" else State.ABSENT
        self.wait_for(self.expected.state)
        if verdict == "fail":
            assert self.view().error

    @rule()
    def cancel(self) -> None:
        reply = self.ask(lambda r: m.CancelDownload(reply=r))
        assert isinstance(reply, m.ModelView)
        if self.expected.state is State.DOWNLOADING:
            self.expected.state = State.ABSENT
            assert reply.partial_bytes > 0  # kept for a later resume

    @rule()
    def load(self) -> None:
        reply = self.ask(lambda r: m.Load(reply=r))
        if self.expected.state in (State.DOWNLOADED, State.LOADED):
            assert isinstance(reply, m.ModelView), reply
            self.expected.state = State.LOADED
        else:
            assert isinstance(reply, Conflict), reply

    @rule()
    def unload(self) -> None:
        reply = self.ask(lambda r: m.Unload(reply=r))
        assert isinstance(reply, m.ModelView)
        if self.expected.state is State.LOADED:
            self.expected.state = State.DOWNLOADED

    @precondition(lambda self: self.expected.state is State.LOADED)
    @rule(signal=st.sampled_from([-9, -11, 1]))
    def worker_dies(self, signal: int) -> None:
        worker = self.spawn.workers[-1]
        self.portal.run(lambda: _call(worker.die, signal))
        self.expected.state = State.DOWNLOADED
        self.wait_for(State.DOWNLOADED)
        assert self.view().error

    @rule(text=st.text(min_size=1, max_size=20))
    def update(self, text: str) -> None:
        new = attrs.evolve(self.spec, description=text)
        reply = self.ask(lambda r: m.UpdateSpec(reply=r, change=lambda _: new))
        assert isinstance(reply, m.ModelView)
        self.spec = new
        self.expected.description = text

    @rule()
    def delete(self) -> None:
        reply = self.ask(lambda r: m.Delete(reply=r))
        assert isinstance(reply, m.ModelView)
        self.expected.state = State.ABSENT
        assert not self.store.model_path(MODEL_ID).exists()
        assert 0 == reply.partial_bytes

    @rule()
    def restart(self) -> None:
        self._stop_actor()
        if self.expected.state is State.LOADED:
            self.expected.state = State.DOWNLOADED  # workers never outlive their actor
            assert self.spawn.workers[-1].closed.is_set()
        if self.expected.state is State.DOWNLOADING:
            self.fetch.outcome = None  # an interrupted download resumes by itself
        records = {s.id: s for s in self.store.load_records()}
        assert self.expected.description == records[MODEL_ID].description
        self._start_actor()
        if self.expected.state is State.DOWNLOADING:
            self.wait_fetch_started()

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def matches_the_contract(self) -> None:
        view = self.view()
        assert self.expected.state == view.state
        assert self.expected.description == view.spec.description
        check_consistent(view, self.store)


async def _call(fn: Callable[..., Any], *args: Any) -> None:
    fn(*args)


ActorMachine.TestCase.settings = settings(
    # Enough to reach sequences like download, finish, load, restart (checked by mutation).
    max_examples=int(os.environ.get("MODELD_MACHINE_EXAMPLES", "60")),
    stateful_step_count=25, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestActorMachine = pytest.mark.slow(ActorMachine.TestCase)
