"""The registry's supervision on virtual time: real actors and a real Store in tmp_path, with a
fake fetcher and fake workers below them, and a store that fails where a disk would.

Each test here failed before the supervision fixes of issue 12 (a hung caller, a start-up that
never finished, a stranded subscriber, a wrong delete, a coalesced RESET).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import structlog.testing
import trio
import trio.testing

from actors import messages as m
from actors.errors import Conflict, InsufficientMemory, OperationFailed, Unavailable
from actors.memory import MEMORY_MARGIN
from actors.progress import Broadcaster, must_deliver
from actors.spec import ModelSpec
from actors.state import State
from actors.store import Store
from supervisor.config import Config, RuntimeConfig
from supervisor.gate import LruGate
from supervisor.registry import (
    MAX_RESTART_DELAY,
    Registry,
    restart_delay,
    serve_registry,
)
from tests.actors.test_model_actor import (
    URL,
    FakeFetch,
    FakeSpawner,
    write_partial,
)

pytestmark = pytest.mark.usefixtures("inline_threads")  # tests/actors/conftest.py

HANG_SECONDS = 3600.0


@attrs.frozen
class FlakyStore(Store):
    """A Store whose reads of one model's files fail `failures` times (EACCES), and whose
    record writes fail with ENOSPC while `disk_full` holds."""

    failing: str = ""
    failures: list[float] = attrs.field(factory=list)  # virtual times of the failed reads
    fail_times: list[int] = attrs.field(factory=lambda: [0])
    disk_full: list[bool] = attrs.field(factory=lambda: [False])

    def has_model_file(self, model_id: str) -> bool:
        if model_id == self.failing and len(self.failures) < self.fail_times[0]:
            self.failures.append(trio.current_time())
            raise PermissionError(errno.EACCES, "Permission denied",
                                  str(self.model_path(model_id)))
        return super().has_model_file(model_id)

    def write_record(self, spec: ModelSpec) -> None:
        if self.disk_full[0]:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.record_path(spec.id)))
        super().write_record(spec)


def make_store(tmp_path: Path, **kwargs: Any) -> FlakyStore:
    root = tmp_path / "storage"
    Store.open(root)
    return FlakyStore(root.resolve(), **kwargs)


def spec(model_id: str, **changes: Any) -> ModelSpec:
    return attrs.evolve(ModelSpec(id=model_id, name=model_id, url=URL, custom=True), **changes)


@contextlib.asynccontextmanager
async def running(store: Store, specs: list[ModelSpec], *, fetch: FakeFetch,
                  spawn: FakeSpawner | None = None, max_loaded: int = 2,
                  logs: list[dict[str, Any]] | None = None) -> AsyncIterator[Registry]:
    for s in specs:
        store.write_record(s)
    config = Config(runtime=RuntimeConfig(max_loaded=max_loaded))
    # Captured, not rendered: a console traceback per crash takes a second on a busy machine.
    with structlog.testing.capture_logs() as captured, trio.fail_after(HANG_SECONDS):
        async with trio.open_nursery() as nursery:
            registry: Registry = await nursery.start(
                lambda task_status: serve_registry(
                    config, fetch=fetch, spawn=spawn or FakeSpawner(), store=store,
                    task_status=task_status))
            yield registry
            nursery.cancel_scope.cancel()
    if logs is not None:
        logs.extend(captured)


async def wait_until(check: Callable[[], bool]) -> None:
    """Poll on virtual time: the registry has no event for every fact these tests wait on."""
    while not check():  # noqa: ASYNC110
        await trio.sleep(0.01)


def published(store: Store, model_id: str, data: bytes) -> None:
    store.model_path(model_id).write_bytes(data)


# -- a crash answers the caller in hand ---------------------------------------------------------


async def test_crash_answers_the_command_in_hand_and_restarts_from_disk(
        autojump_clock: trio.abc.Clock, tmp_path: Path, gguf: bytes) -> None:
    store = make_store(tmp_path)
    published(store, "a", gguf)
    spawn = FakeSpawner()
    async with running(store, [spec("a")], fetch=FakeFetch(gguf), spawn=spawn) as registry:
        view = await registry.call("a", lambda r: m.Load(reply=r))
        assert State.LOADED == view.state
        store.disk_full[0] = True
        began = trio.current_time()
        with structlog.testing.capture_logs() as logs:
            with pytest.raises(OperationFailed) as caught:
                await registry.call("a", lambda r: m.UpdateSpec(
                    reply=r, change=lambda s: attrs.evolve(s, description="new")))
            assert 0.0 == trio.current_time() - began  # answered at once, not after a timeout
            assert "updating the model's record failed: No space left on device" in str(
                caught.value)
            assert "actor_crashed" == caught.value.code  # OperationFailed: a 500
            # The worker of the crashed actor is stopped on purpose, never left running.
            await spawn.workers[0].closed.wait()
            await wait_until(lambda: registry.view("a").error is not None)
            down = registry.view("a")
            assert State.DOWNLOADED == down.state
            assert down.error is not None and "No space left on device" in down.error
            store.disk_full[0] = False
            await wait_until(lambda: registry.view("a").error is None)
        crashes = [e for e in logs if e["event"] == "actor_crashed"]
        assert 1 == len(crashes)
        assert crashes[0]["log_level"] == "error" and crashes[0].get("exc_info")
        # The next actor read the state from disk, and serves.
        assert State.DOWNLOADED == registry.view("a").state
        assert "" == registry.view("a").spec.description or registry.view(
            "a").spec.description is None
        view = await registry.call("a", lambda r: m.Load(reply=r))
        assert State.LOADED == view.state
        assert 2 == len(spawn.workers)


# -- start-up never waits on a broken model, and backs off ---------------------------------------


async def test_first_start_failing_does_not_hold_up_the_others(
        autojump_clock: trio.abc.Clock, tmp_path: Path, gguf: bytes) -> None:
    store = make_store(tmp_path, failing="broken", fail_times=[3])
    published(store, "fine", gguf)
    async with running(store, [spec("broken"), spec("fine")], fetch=FakeFetch(gguf)) as registry:
        assert 0.0 == trio.current_time()  # started without waiting for a restart
        broken = registry.view("broken")
        assert State.ABSENT == broken.state
        assert broken.error is not None
        assert "Permission denied" in broken.error and "storage dir" in broken.error
        assert State.DOWNLOADED == registry.view("fine").state
        assert ["broken", "fine"] == [v.spec.id for v in registry.views()]
        # A command to the broken model is refused at once, not left waiting.
        with pytest.raises(Unavailable):
            await registry.call("broken", lambda r: m.StartDownload(reply=r))
        await wait_until(lambda: registry.view("broken").error is None)
        # Three failed reads, retried after 1 s and 2 s, then 4 s: the fourth read served.
        assert [0.0, 1.0, 3.0] == [round(t, 2) for t in store.failures]
        assert 7.0 <= trio.current_time() < 7.5


async def test_a_persistent_failure_backs_off_to_five_minutes(
        autojump_clock: trio.abc.Clock, tmp_path: Path, gguf: bytes) -> None:
    store = make_store(tmp_path, failing="broken", fail_times=[10**6])
    logs: list[dict[str, Any]] = []
    async with running(store, [spec("broken")], fetch=FakeFetch(gguf), logs=logs):
        await trio.sleep(2000)
    crashes = [e for e in logs if e["event"] == "actor_crashed"]
    assert len(crashes) == len(store.failures)
    gaps = [round(b - a, 2) for a, b in zip(store.failures, store.failures[1:], strict=False)]
    assert [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 300.0, 300.0] == gaps[:11]
    assert MAX_RESTART_DELAY == restart_delay(50)


async def test_shutdown_while_restarting(autojump_clock: trio.abc.Clock, tmp_path: Path,
                                         gguf: bytes) -> None:
    store = make_store(tmp_path, failing="broken", fail_times=[10**6])
    async with running(store, [spec("broken")], fetch=FakeFetch(gguf)):
        await wait_until(lambda: len(store.failures) == 3)
    stopped_at = trio.current_time()
    assert 3 == len(store.failures)  # the pending restart never ran
    assert stopped_at < 3.0 + 4.0


# -- subscribers of a crashed actor hear the truth ------------------------------------------------


async def test_subscribers_of_a_crashed_download_get_failed_then_it_resumes(
        autojump_clock: trio.abc.Clock, tmp_path: Path, gguf: bytes) -> None:
    store = make_store(tmp_path)
    fetch = FakeFetch(gguf)
    async with running(store, [spec("a")], fetch=fetch) as registry:
        await registry.call("a", lambda r: m.StartDownload(reply=r))
        await fetch.started.wait()
        seen: list[m.Progress] = []

        async def subscribe(task_status: trio.TaskStatus[None]) -> None:
            async for p in registry.broadcaster("a").subscribe():
                seen.append(p)
                if len(seen) == 1:
                    task_status.started()
                if p.terminal:
                    return

        async with trio.open_nursery() as nursery:
            await nursery.start(subscribe)
            store.disk_full[0] = True
            with pytest.raises(OperationFailed):
                await registry.call("a", lambda r: m.UpdateSpec(reply=r, change=lambda s: s))
        assert "FAILED" == seen[-1].status
        assert seen[-1].error is not None and "No space left on device" in seen[-1].error
        store.disk_full[0] = False
        # The next actor finds the partial (not held: nobody cancelled it) and resumes.
        await wait_until(lambda: registry.view("a").state is State.DOWNLOADING)
        assert 2 == len(fetch.calls)
        assert not registry.broadcaster("a").value.terminal


# -- reads never wait on an actor ----------------------------------------------------------------


async def test_views_never_wait_on_a_busy_actor(autojump_clock: trio.abc.Clock, tmp_path: Path,
                                                gguf: bytes) -> None:
    store = make_store(tmp_path)
    for model_id in ("a", "b"):
        published(store, model_id, gguf)
    spawn = FakeSpawner()
    async with running(store, [spec("a"), spec("b")], fetch=FakeFetch(gguf),
                       spawn=spawn) as registry:
        await registry.call("a", lambda r: m.Load(reply=r))
        release = trio.Event()
        worker = spawn.workers[0]
        original = worker.aclose

        async def slow_close(grace: float = 3.0) -> None:
            await release.wait()
            await original(grace)

        worker.aclose = slow_close  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(registry.call, "a", lambda r: m.Unload(reply=r))
            await trio.testing.wait_all_tasks_blocked()
            began = trio.current_time()
            views = registry.views()
            assert ["a", "b"] == [v.spec.id for v in views]
            assert State.UNLOADING == registry.view("a").state
            assert began == trio.current_time()
            release.set()
        assert State.DOWNLOADED == registry.view("a").state


# -- updates merge inside the actor ----------------------------------------------------------------


async def test_concurrent_updates_lose_nothing(autojump_clock: trio.abc.Clock, tmp_path: Path,
                                               gguf: bytes) -> None:
    store = make_store(tmp_path)
    async with running(store, [spec("a")], fetch=FakeFetch(gguf)) as registry:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(registry.call, "a", lambda r: m.UpdateSpec(
                reply=r, change=lambda s: attrs.evolve(s, description="described")))
            nursery.start_soon(registry.call, "a", lambda r: m.UpdateSpec(
                reply=r, change=lambda s: attrs.evolve(s, name="renamed")))
        view = registry.view("a")
        assert ("renamed", "described") == (view.spec.name, view.spec.description)
        on_disk = {s.id: s for s in store.load_records()}["a"]
        assert ("renamed", "described") == (on_disk.name, on_disk.description)


# -- deletes remove exactly what the model owns ----------------------------------------------------


async def test_delete_spares_models_whose_ids_share_a_prefix(
        autojump_clock: trio.abc.Clock, tmp_path: Path, gguf: bytes) -> None:
    store = make_store(tmp_path)
    ids = ["a", "a.gguf", "a.gguf.partial"]
    for model_id in ids:
        published(store, model_id, gguf)
        write_partial(store.model_path(model_id), gguf, 10)
    async with running(store, [spec(i) for i in ids], fetch=FakeFetch(gguf)) as registry:
        await registry.delete("a")
        assert ["a.gguf", "a.gguf.partial"] == [v.spec.id for v in registry.views()]
        for model_id in ids[1:]:
            assert store.has_model_file(model_id)
            assert store.model_path(model_id).with_name(
                store.model_path(model_id).name + ".partial").exists()
            assert State.DOWNLOADED == registry.view(model_id).state
    models = sorted(p.name for p in (store.root / "models").iterdir())
    assert "a.gguf" not in models
    assert {"a.gguf.gguf", "a.gguf.partial.gguf"} <= set(models)


# -- RESET and terminal statuses are never coalesced ---------------------------------------------


async def test_a_slow_subscriber_still_sees_every_reset_and_terminal(
        autojump_clock: trio.abc.Clock) -> None:
    progress = Broadcaster(m.Progress(model="a"), keep=must_deliver)
    seen: list[str] = []

    async def slow(task_status: trio.TaskStatus[None]) -> None:
        async for p in progress.subscribe():
            seen.append(f"{p.status} {p.percentage:g}")
            if len(seen) == 1:
                task_status.started()
            if len(seen) == 5:
                return
            await trio.sleep(1)  # slower than the producer below

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(slow)
            for status, pct in [("INITIALIZED", 0), ("IN-PROGRESS", 40), ("IN-PROGRESS", 60),
                                ("RESET", 0), ("IN-PROGRESS", 1), ("IN-PROGRESS", 5)]:
                progress.publish(m.Progress(model="a", status=status, percentage=pct))
            await trio.sleep(2.5)  # the subscriber has read "IN-PROGRESS 5" (at 2 s) by now
            for status, pct in [("IN-PROGRESS", 50), ("COMPLETED", 100), ("INITIALIZED", 0),
                                ("IN-PROGRESS", 3)]:
                progress.publish(m.Progress(model="a", status=status, percentage=pct))
    assert ["UNKNOWN 0", "RESET 0", "IN-PROGRESS 5", "COMPLETED 100", "IN-PROGRESS 3"] == \
        seen[:5]


# -- the load gate ---------------------------------------------------------------------------------


class FakeRegistry:
    """What LruGate asks of the registry: unload a victim (which releases it and gives its
    memory back), and each model's view."""

    def __init__(self, refuse: set[str] | None = None) -> None:
        self.gate: LruGate | None = None
        self.unloaded: list[str] = []
        self.refuse = refuse or set()
        self.busy: set[str] = set()  # in use: its actor refuses an eviction
        self.loading: set[str] = set()
        self.rss: dict[str, int] = {}  # resident bytes of the loaded models
        self.available = 10**12  # what the system reports available

    def view(self, model_id: str) -> Any:
        return View(busy=int(model_id in self.busy),
                    state=State.LOADING if model_id in self.loading else State.LOADED,
                    worker_pid=None, memory_estimate=self.rss.get(model_id))

    async def call(self, model_id: str, make: Any) -> None:
        await trio.sleep(1)
        if model_id in self.busy:
            assert make(None).if_idle
            raise Conflict("the model is in use", code="busy")
        self.unloaded.append(model_id)
        if model_id not in self.refuse:
            assert self.gate is not None
            self.gate.release(model_id)
            self.available += self.rss.pop(model_id, 0)


View = attrs.make_class("View", ["busy", "state", "worker_pid", "memory_estimate"])


def gate(max_loaded: int, refuse: set[str] | None = None,
         wait: float = 0.0) -> tuple[LruGate, FakeRegistry]:
    fake = FakeRegistry(refuse)
    fake.gate = LruGate(fake, max_loaded, memory=lambda: fake.available,  # type: ignore[arg-type]
                        wait=wait)
    return fake.gate, fake


async def test_gate_evicts_the_least_recently_used(autojump_clock: trio.abc.Clock) -> None:
    lru, fake = gate(2)
    await lru.admit("a", 0)
    await lru.admit("b", 0)
    lru.touch("a")
    await lru.admit("c", 0)
    assert ["b"] == fake.unloaded
    await lru.admit("d", 0)
    assert ["b", "a"] == fake.unloaded


async def test_gate_refuses_when_eviction_frees_nothing(autojump_clock: trio.abc.Clock) -> None:
    lru, fake = gate(1, refuse={"a"})
    await lru.admit("a", 0)
    with pytest.raises(Unavailable, match="could not unload a"):
        await lru.admit("b", 0)
    assert ["a"] == fake.unloaded


async def test_gate_never_evicts_a_model_in_use(autojump_clock: trio.abc.Clock) -> None:
    lru, fake = gate(2)
    await lru.admit("a", 0)
    await lru.admit("b", 0)
    fake.busy.add("a")  # the least recently used, but generating
    await lru.admit("c", 0)
    assert ["b"] == fake.unloaded
    fake.busy.add("c")
    with pytest.raises(Unavailable, match="every loaded model is in use") as info:
        await lru.admit("d", 0)
    assert "all_busy" == info.value.code
    assert ["b"] == fake.unloaded
    fake.busy.discard("a")
    await lru.admit("d", 0)
    assert ["b", "a"] == fake.unloaded


async def test_gate_skips_a_model_that_became_busy(autojump_clock: trio.abc.Clock) -> None:
    lru, fake = gate(2)
    for model_id in ("a", "b"):
        await lru.admit(model_id, 0)
    fake.busy.add("a")
    fake.view = lambda model_id: View(0, State.LOADED, None, None)  # type: ignore[method-assign]
    await lru.admit("c", 0)  # a's actor refused (a request began): b goes instead
    assert ["b"] == fake.unloaded


async def test_concurrent_admits_stay_within_max_loaded(autojump_clock: trio.abc.Clock) -> None:
    lru, fake = gate(1)
    admitted: list[str] = []

    async def admit(model_id: str) -> None:
        await lru.admit(model_id, 0)
        admitted.append(model_id)

    async with trio.open_nursery() as nursery:
        for model_id in ("a", "b", "c"):
            nursery.start_soon(admit, model_id)
    assert ["a", "b", "c"] == sorted(admitted)
    assert 2 == len(fake.unloaded)  # each later admit evicted the one before it
    await lru.admit(admitted[-1], 0)  # already in: nothing to evict
    assert 2 == len(fake.unloaded)


async def test_gate_makes_room_in_memory_or_refuses_with_the_numbers(
        autojump_clock: trio.abc.Clock) -> None:
    lru, fake = gate(8)
    fake.available = MEMORY_MARGIN + 1000
    await lru.admit("a", 400)
    fake.rss["a"], fake.available = 400, fake.available - 400
    await lru.admit("b", 400)
    fake.rss["b"], fake.available = 400, fake.available - 400
    fake.busy.add("a")
    # 1000 are needed, 200 free: unloading b (400) is not enough, and a is in use: refused
    # before anything is unloaded.
    with pytest.raises(InsufficientMemory) as info:
        await lru.admit("c", 1000)
    assert "insufficient_memory" == info.value.code
    assert [] == fake.unloaded
    message = str(info.value)
    assert "c needs ~0.00 GB" in message and "after unloading idle models" in message
    # 500 needed: b, idle, is unloaded to make room; a, in use, stays.
    await lru.admit("c", 500)
    assert ["b"] == fake.unloaded
    assert ["b"] == lru.take_evicted("c")


async def test_gate_counts_the_memory_of_loads_under_way(autojump_clock: trio.abc.Clock) -> None:
    """Two loads admitted one after the other: the second sees the first's estimate as taken,
    though its worker has not taken it yet."""
    lru, fake = gate(8)
    fake.available = MEMORY_MARGIN + 1000
    fake.loading.add("a")
    await lru.admit("a", 800)
    with pytest.raises(InsufficientMemory):
        await lru.admit("b", 800)
    fake.loading.discard("a")  # loaded: its memory now shows in what the system reports
    fake.rss["a"], fake.available = 800, fake.available - 800
    await lru.admit("b", 800)  # by unloading a, idle
    assert ["a"] == fake.unloaded


async def test_a_load_waits_for_a_model_in_use_then_evicts_it(
        autojump_clock: trio.abc.Clock) -> None:
    """Every loaded model in use: the load waits ([runtime] load_wait) until one is idle, and
    evicts that one; one that stays in use past the wait is a 503 that says so."""
    lru, fake = gate(2, wait=30)
    await lru.admit("a", 0)
    await lru.admit("b", 0)
    fake.busy |= {"a", "b"}

    async def idle_later(model_id: str, seconds: float) -> None:
        await trio.sleep(seconds)
        fake.busy.discard(model_id)
        lru.idle(model_id)  # as its actor tells the gate

    async with trio.open_nursery() as nursery:
        nursery.start_soon(idle_later, "b", 5)
        started = trio.current_time()
        await lru.admit("c", 0)
        assert 6 == pytest.approx(trio.current_time() - started)  # b idle at 5; its unload: 1 s
    assert ["b"] == fake.unloaded
    fake.busy.add("c")
    started = trio.current_time()
    with pytest.raises(Unavailable, match="after waiting 30 s") as info:
        await lru.admit("d", 0)
    assert "all_busy" == info.value.code
    assert 30 == pytest.approx(trio.current_time() - started)
    assert ["b"] == fake.unloaded


async def test_a_load_waits_for_memory_held_by_a_model_in_use(
        autojump_clock: trio.abc.Clock) -> None:
    """The memory a load needs is held by a model in use: it waits for it to be idle, then
    evicts it; a load that no eviction could make room for is refused at once."""
    lru, fake = gate(8, wait=30)
    fake.available = MEMORY_MARGIN + 1000
    await lru.admit("a", 800)
    fake.rss["a"], fake.available = 800, fake.available - 800
    fake.busy.add("a")
    started = trio.current_time()
    with pytest.raises(InsufficientMemory, match="c needs"):
        await lru.admit("c", 2000)  # more than a frees: no waiting
    assert started == trio.current_time()

    async def idle_later() -> None:
        await trio.sleep(3)
        fake.busy.discard("a")
        lru.idle("a")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(idle_later)
        await lru.admit("b", 800)
    assert ["a"] == fake.unloaded
    assert 4 == pytest.approx(trio.current_time() - started)
    fake.rss["b"], fake.available, fake.busy = 800, fake.available - 800, {"b"}
    with pytest.raises(InsufficientMemory, match="b in use after waiting 30 s"):
        await lru.admit("d", 800)
