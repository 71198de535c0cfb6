"""ModelActor on virtual time: a real Store in tmp_path, a fake fetcher and fake workers.

Blocking calls the actor hands to threads run inline here (`inline_threads`), so the autojump
clock never races a real thread and every test is deterministic.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import structlog
import trio
import trio.testing

from actors import file_update
from actors import messages as m
from actors.download import DownloadRequest, FileInvalid, OriginUnreachable, ProgressSink
from actors.download.errors import DiskFull
from actors.errors import Conflict, InvalidInput, ModelError, OperationFailed
from actors.generation import GenerationStream
from actors.gguf import GGUF_MAGIC
from actors.model import ActorSettings, ModelActor
from actors.partial import (
    Sidecar,
    held_marker,
    partial_path,
    remove_partial,
    sidecar_path,
    write_sidecar,
)
from actors.spec import ModelSpec
from actors.state import State, flags
from actors.store import Store
from actors.worker import (
    GenerateParams,
    GenerationResult,
    WorkerDied,
    WorkerInfo,
    WorkerRequestError,
    WorkerStartError,
)
from supervisor.wire import model_json
from tests.actors.gates import OpenGate
from tests.gguf_factory import corrupt_header

T = TypeVar("T")
# Blocking store work runs inline (tests/actors/conftest.py), in step with the clock.
pytestmark = pytest.mark.usefixtures("inline_threads")
MODEL_ID = "tiny"
URL = "https://models.test/tiny.gguf"
SPAWN_SECONDS = 0.5  # virtual time a fake worker takes to load
HANG_SECONDS = 600.0


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "storage")


# -- fakes -----------------------------------------------------------------------------------


class FakeFetch:
    """Writes half the file as a partial (with a sidecar, as the real downloader does), then
    waits for `proceed`; then fails with `error` or publishes the whole file."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls: list[DownloadRequest] = []
        self.started = trio.Event()
        self.proceed = trio.Event()
        self.error: Exception | None = None
        self.hang_after_publish = False

    @property
    def half(self) -> int:
        return len(self.data) // 2

    async def __call__(self, req: DownloadRequest, sink: ProgressSink) -> None:
        self.calls.append(req)
        write_partial(req.dest, self.data, self.half)
        sink.update(self.half, len(self.data))
        self.started.set()
        await self.proceed.wait()
        if self.error is not None:
            raise self.error
        req.dest.write_bytes(self.data)
        remove_partial(req.dest)
        sink.update(len(self.data), len(self.data))
        if self.hang_after_publish:
            # Published, but not returned yet: a cancel arriving now races the completion.
            await trio.sleep_forever()


def write_partial(dest: Path, data: bytes, n: int) -> None:
    partial_path(dest).write_bytes(data[:n])
    write_sidecar(dest, Sidecar(URL, '"etag"', None, len(data), [(0, n)]))


class FakeGeneration:
    def __init__(self, worker: FakeWorker, prompt: str, params: GenerateParams) -> None:
        self._worker = worker
        self._prompt = prompt
        self._pieces = iter(worker.pieces[: params.max_new_tokens])
        self._count = 0
        self.result: GenerationResult | None = None
        self.closed = False

    async def __anext__(self) -> str:
        await trio.sleep(0.01)  # one token's time
        if self._worker.returncode is not None:
            raise WorkerDied(f"worker {self._worker.pid} exited",
                             returncode=self._worker.returncode)
        try:
            piece = next(self._pieces)
        except StopIteration:
            self.result = GenerationResult(len(self._prompt), self._count, "stop")
            raise StopAsyncIteration from None
        self._count += 1
        return piece

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self.closed = True


class FakeWorker:
    def __init__(self, pid: int, context_length: int) -> None:
        self.pid = pid
        self.info = WorkerInfo(pid=pid, context_length=context_length, vocab_size=260,
                               load_seconds=0.01)
        self.pieces = ["Hel", "lo", " 😀", " 漢字"]
        self.returncode: int | None = None
        self.exited = trio.Event()
        self.closed = trio.Event()
        self.streams: list[FakeGeneration] = []

    def die(self, returncode: int) -> None:
        if self.returncode is None:
            self.returncode = returncode
            self.exited.set()

    async def wait_exited(self) -> int:
        await self.exited.wait()
        assert self.returncode is not None
        return self.returncode

    async def aclose(self, grace: float = 3.0) -> None:
        await trio.lowlevel.checkpoint()
        self.die(0)
        self.closed.set()

    def generate(self, prompt: str, params: GenerateParams) -> FakeGeneration:
        stream = FakeGeneration(self, prompt, params)
        self.streams.append(stream)
        return stream


class FakeSpawner:
    def __init__(self) -> None:
        self.specs: list[ModelSpec] = []
        self.workers: list[FakeWorker] = []
        self.error: Exception | None = None
        self.gate: trio.Event | None = None  # when set, a spawn waits for it

    async def __call__(self, path: Path, spec: ModelSpec,
                       chat_template: str | None = None) -> FakeWorker:
        self.specs.append(spec)
        await trio.sleep(SPAWN_SECONDS)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        worker = FakeWorker(1000 + len(self.workers), spec.context_length or 512)
        self.workers.append(worker)
        return worker


@attrs.define
class RecordingGate(OpenGate):
    calls: list[tuple[str, str]] = attrs.Factory(list)
    needs: list[int] = attrs.Factory(list)

    async def admit(self, model_id: str, need: int) -> None:
        self.calls.append(("admit", model_id))
        self.needs.append(need)
        await trio.lowlevel.checkpoint()

    def release(self, model_id: str) -> None:
        self.calls.append(("release", model_id))

    def touch(self, model_id: str) -> None:
        self.calls.append(("touch", model_id))


@attrs.define
class Rig:
    actor: ModelActor
    store: Store
    fetch: FakeFetch
    spawn: FakeSpawner
    gate: RecordingGate

    @property
    def dest(self) -> Path:
        return self.store.model_path(MODEL_ID)

    async def ask(self, make: Callable[[trio.MemorySendChannel[m.Reply]], m.Command]) -> m.Reply:
        send, recv = trio.open_memory_channel[m.Reply](1)
        await self.actor.mailbox.send(make(send))
        async with recv:
            return await recv.receive()

    async def view(self, make: Callable[[trio.MemorySendChannel[m.Reply]], m.Command]
                   = lambda r: m.GetSnapshot(reply=r)) -> m.ModelView:
        reply = await self.ask(make)
        assert isinstance(reply, m.ModelView), reply
        check_consistent(reply, self.store)
        return reply

    async def refused(self, make: Callable[[trio.MemorySendChannel[m.Reply]], m.Command]
                      ) -> ModelError:
        reply = await self.ask(make)
        assert isinstance(reply, ModelError), reply
        check_consistent(await self.view(), self.store)
        return reply

    async def generate(self, prompt: str, params: GenerateParams | None = None
                       ) -> GenerationStream | ModelError:
        params = params or GenerateParams()
        send, recv = trio.open_memory_channel[GenerationStream | ModelError](1)
        await self.actor.mailbox.send(m.Generate(prompt=prompt, params=params, reply=send))
        async with recv:
            return await recv.receive()

    async def wait_progress(self, status: str) -> m.Progress:
        async for snapshot in self.actor.progress.subscribe():
            if snapshot.status == status:
                return snapshot
        raise AssertionError("unreachable")


def check_consistent(view: m.ModelView, store: Store) -> None:
    """The three wire booleans follow the state, and the state follows the files and worker."""
    body = model_json(view)
    f = flags(view.state)
    assert (f.downloaded, f.downloading, f.loaded) == (
        body["downloaded"], body["downloading"], body["loaded"])
    assert not (body["downloaded"] and body["downloading"])
    assert not (body["loaded"] and not body["downloaded"])
    assert view.state.value == body["state"]
    assert body["downloaded"] == store.has_model_file(view.spec.id)
    assert (view.worker_pid is not None) == (view.state is State.LOADED)
    assert (view.load_seconds is not None) == (view.state is State.LOADED)


def spec(**changes: Any) -> ModelSpec:
    return attrs.evolve(ModelSpec(id=MODEL_ID, name="Tiny", url=URL), **changes)


Start = Callable[..., contextlib.AbstractAsyncContextManager[Rig]]


@pytest.fixture
def start(store: Store, gguf: bytes) -> Start:
    """``async with start(spec, rig=...) as rig:`` runs a fresh actor (on the rig's fakes,
    or new ones) until the block ends; a second actor on the same rig is a restart."""

    @contextlib.asynccontextmanager
    async def running(model: ModelSpec | None = None,
                      rig: Rig | None = None) -> AsyncIterator[Rig]:
        fetch, spawn, gate = ((rig.fetch, rig.spawn, rig.gate) if rig is not None
                              else (FakeFetch(gguf), FakeSpawner(), RecordingGate()))
        actor = ModelActor(model or spec(), store, settings=ActorSettings(), fetch=fetch,
                           spawn=spawn, gate=gate)
        # Virtual seconds: a test that hangs fails at once instead (autojump).
        with trio.fail_after(HANG_SECONDS):
            async with trio.open_nursery() as nursery:
                await nursery.start(actor.run)
                yield Rig(actor=actor, store=store, fetch=fetch, spawn=spawn, gate=gate)
                nursery.cancel_scope.cancel()

    return running


def published(store: Store, gguf: bytes) -> Path:
    dest = store.model_path(MODEL_ID)
    dest.write_bytes(gguf)
    return dest


async def collect(stream: GenerationStream) -> list[str]:
    async with stream:
        return [piece async for piece in stream]


# -- downloads -------------------------------------------------------------------------------


async def test_two_downloads_join_one_fetch(autojump_clock: trio.abc.Clock, start: Start,
                                            gguf: bytes) -> None:
    async with start() as rig:
        first = await rig.view(lambda r: m.StartDownload(reply=r))
        second = await rig.view(lambda r: m.StartDownload(reply=r))
        assert (State.DOWNLOADING, State.DOWNLOADING) == (first.state, second.state)
        await rig.fetch.started.wait()
        rig.fetch.proceed.set()
        done = await rig.wait_progress("COMPLETED")
        assert (100.0, len(gguf), len(gguf)) == (done.percentage, done.bytes, done.total)
        view = await rig.view()
        assert 1 == len(rig.fetch.calls)
        assert State.DOWNLOADED == view.state
        assert (None, 0) == (view.error, view.partial_bytes)
        # The GGUF header fills in what the catalog did not say.
        assert view.facts is not None
        assert (len(gguf), 128, "F32") == (
            view.facts.size, view.facts.context_length, view.facts.quantization)
        assert view.facts.parameter_count is not None and view.facts.parameter_count > 0
        # Downloaded already: a new request does not fetch again.
        again = await rig.view(lambda r: m.StartDownload(reply=r))
        assert (State.DOWNLOADED, 1) == (again.state, len(rig.fetch.calls))


async def test_cancel_keeps_the_partial_held(autojump_clock: trio.abc.Clock, start: Start,
                                             store: Store) -> None:
    async with start() as rig:
        await rig.view(lambda r: m.StartDownload(reply=r))
        await rig.fetch.started.wait()
        view = await rig.view(lambda r: m.CancelDownload(reply=r))
        assert (State.ABSENT, False, None) == (view.state, flags(view.state).downloading,
                                               view.error)
        assert rig.fetch.half == view.partial_bytes
        assert held_marker(rig.dest).exists()
        assert "CANCELED" == rig.actor.progress.value.status
        # Idempotent.
        assert State.ABSENT == (await rig.view(lambda r: m.CancelDownload(reply=r))).state

    # A restart does not resume a cancelled download by itself ...
    async with start(rig=rig) as rig:
        await trio.testing.wait_all_tasks_blocked()
        view = await rig.view()
        assert (State.ABSENT, rig.fetch.half, 1) == (
            view.state, view.partial_bytes, len(rig.fetch.calls))
        # ... but the next request does, and the marker goes.
        rig.fetch.proceed.set()
        await rig.view(lambda r: m.StartDownload(reply=r))
        await rig.wait_progress("COMPLETED")
        assert 2 == len(rig.fetch.calls)
        assert State.DOWNLOADED == (await rig.view()).state
        assert not held_marker(rig.dest).exists()


@pytest.mark.parametrize("fetch_returned", [False, True])
async def test_cancel_racing_completion_ends_downloaded(
    autojump_clock: trio.abc.Clock, start: Start, fetch_returned: bool
) -> None:
    async with start() as rig:
        # False: the file is published but the fetch has not returned when the cancel comes.
        rig.fetch.hang_after_publish = not fetch_returned
        rig.fetch.proceed.set()
        await rig.view(lambda r: m.StartDownload(reply=r))
        await trio.testing.wait_all_tasks_blocked()
        assert rig.dest.exists()
        assert rig.fetch.hang_after_publish == (rig.actor.state is State.DOWNLOADING)
        view = await rig.view(lambda r: m.CancelDownload(reply=r))
        assert State.DOWNLOADED == view.state
        await trio.testing.wait_all_tasks_blocked()
        view = await rig.view()
        assert (State.DOWNLOADED, None, 0) == (view.state, view.error, view.partial_bytes)
        assert "COMPLETED" == rig.actor.progress.value.status
        assert not held_marker(rig.dest).exists()
        assert not partial_path(rig.dest).exists()
        assert 1 == len(rig.fetch.calls)


async def test_a_full_disk_says_a_partial_is_kept_only_when_one_is(
        autojump_clock: trio.abc.Clock, start: Start) -> None:
    async with start() as rig:
        rig.fetch.error = DiskFull("no space left for m.gguf; free some space")
        rig.fetch.proceed.set()
        await rig.view(lambda r: m.StartDownload(reply=r))
        failed = await rig.wait_progress("FAILED")
        assert failed.error is not None
        assert failed.error.endswith(f"(the {rig.fetch.half} bytes done are kept: it resumes "
                                     "from there)")
        rig.fetch.data = b""  # this time no byte is done: no word of a partial
        await rig.view(lambda r: m.StartDownload(reply=r))
        failed = await rig.wait_progress("FAILED")
        assert failed.error is not None and "kept" not in failed.error


async def test_failed_download_is_absent_with_the_error(autojump_clock: trio.abc.Clock,
                                                        start: Start) -> None:
    async with start() as rig:
        rig.fetch.error = OriginUnreachable("models.test refused the connection")
        rig.fetch.proceed.set()
        await rig.view(lambda r: m.StartDownload(reply=r))
        failed = await rig.wait_progress("FAILED")
        assert failed.error is not None and "refused the connection" in failed.error
        view = await rig.view()
        assert (State.ABSENT, rig.fetch.half) == (view.state, view.partial_bytes)
        assert view.error is not None and "refused the connection" in view.error
        # A retry starts afresh and clears the error.
        rig.fetch.error = None
        view = await rig.view(lambda r: m.StartDownload(reply=r))
        assert (State.DOWNLOADING, None) == (view.state, view.error)
        await rig.wait_progress("COMPLETED")


async def test_a_download_that_is_not_a_model_fails_with_the_import_rule(
        autojump_clock: trio.abc.Clock, start: Start) -> None:
    """The actor hands the downloader the rule `import` applies (its own `inspect`, and the GGUF
    magic for an early check); the downloader's refusal ends FAILED with its reason and code."""
    async with start() as rig:
        await rig.view(lambda r: m.StartDownload(reply=r))
        await rig.fetch.started.wait()
        request = rig.fetch.calls[0]
        assert (GGUF_MAGIC, rig.actor._inspect) == (request.magic, request.verify)
        remove_partial(rig.dest)  # as the downloader does: these bytes can never be a model
        rig.fetch.error = FileInvalid("the file at models.test is not a GGUF file")
        with structlog.testing.capture_logs() as logs:
            rig.fetch.proceed.set()
            failed = await rig.wait_progress("FAILED")
        assert failed.error is not None and "not a GGUF file" in failed.error
        view = await rig.view()
        assert (State.ABSENT, 0, False) == (view.state, view.partial_bytes,
                                             rig.store.has_model_file(MODEL_ID))
        assert view.error is not None and "not a GGUF file" in view.error
        assert ["model_file_invalid"] == [e["code"] for e in logs
                                          if e["event"] == "download_failed"]


async def test_interrupted_download_resumes_at_start(autojump_clock: trio.abc.Clock,
                                                     start: Start, store: Store,
                                                     gguf: bytes) -> None:
    write_partial(store.model_path(MODEL_ID), gguf, 1000)  # left by a stop, not a cancel
    async with start() as rig:
        await rig.fetch.started.wait()
        view = await rig.view()
        assert State.DOWNLOADING == view.state
        rig.fetch.proceed.set()
        await rig.wait_progress("COMPLETED")
        assert State.DOWNLOADED == (await rig.view()).state
        assert not sidecar_path(rig.dest).exists()


async def test_no_url_cannot_download(autojump_clock: trio.abc.Clock, start: Start) -> None:
    async with start(spec(url=None)) as rig:
        error = await rig.refused(lambda r: m.StartDownload(reply=r))
        assert (Conflict, "no_url") == (type(error), error.code)


# -- load, unload, worker death --------------------------------------------------------------


async def test_load_and_unload(autojump_clock: trio.abc.Clock, start: Start, store: Store,
                               gguf: bytes) -> None:
    published(store, gguf)
    async with start() as rig:
        view = await rig.view(lambda r: m.Load(reply=r))
        worker = rig.spawn.workers[0]
        assert (State.LOADED, worker.pid, SPAWN_SECONDS) == (
            view.state, view.worker_pid, view.load_seconds)
        # The worker gets the context length of the file's header.
        assert 128 == rig.spawn.specs[0].context_length
        assert view.facts is not None and 128 == view.facts.context_length

        again = await rig.view(lambda r: m.Load(reply=r))
        assert (State.LOADED, worker.pid, 1) == (again.state, again.worker_pid,
                                                 len(rig.spawn.specs))

        view = await rig.view(lambda r: m.Unload(reply=r))
        assert (State.DOWNLOADED, None) == (view.state, view.error)
        assert worker.closed.is_set()
        view = await rig.view(lambda r: m.Unload(reply=r))
        assert State.DOWNLOADED == view.state
        assert [("admit", MODEL_ID), ("touch", MODEL_ID), ("release", MODEL_ID)] == \
            rig.gate.calls


async def test_concurrent_loads_share_one_worker(autojump_clock: trio.abc.Clock, start: Start,
                                                 store: Store, gguf: bytes) -> None:
    published(store, gguf)
    async with start() as rig:
        views: list[m.Reply] = []

        async def load() -> None:
            views.append(await rig.ask(lambda r: m.Load(reply=r)))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(load)
        assert 1 == len(rig.spawn.workers)
        assert all(isinstance(v, m.ModelView) and v.state is State.LOADED for v in views)


async def test_load_refused_unless_downloaded(autojump_clock: trio.abc.Clock,
                                              start: Start) -> None:
    async with start() as rig:
        error = await rig.refused(lambda r: m.Load(reply=r))
        assert (Conflict, "not_loadable") == (type(error), error.code)
        assert "download it first" in str(error)
        await rig.view(lambda r: m.StartDownload(reply=r))
        error = await rig.refused(lambda r: m.Load(reply=r))
        assert (Conflict, "not_loadable") == (type(error), error.code)
        assert "still downloading" in str(error)
        assert [] == rig.spawn.specs
        assert (await rig.view()).error is None  # a refused command is not a failure


async def test_worker_death_is_recorded(autojump_clock: trio.abc.Clock, start: Start,
                                        store: Store, gguf: bytes) -> None:
    published(store, gguf)
    async with start() as rig:
        await rig.view(lambda r: m.Load(reply=r))
        worker = rig.spawn.workers[0]
        worker.die(-signal.SIGKILL)
        await worker.closed.wait()  # the actor reaps it after moving the state
        view = await rig.view()
        assert (State.DOWNLOADED, None) == (view.state, view.worker_pid)
        assert view.error is not None and "signal 9" in view.error
        assert ("release", MODEL_ID) == rig.gate.calls[-1]
        # Loading again starts a new worker and clears the error.
        view = await rig.view(lambda r: m.Load(reply=r))
        assert (State.LOADED, None, rig.spawn.workers[1].pid) == (
            view.state, view.error, view.worker_pid)


async def test_bad_file_is_refused_before_any_worker(autojump_clock: trio.abc.Clock,
                                                     start: Start, store: Store,
                                                     tmp_path: Path, gguf: bytes) -> None:
    source = tmp_path / "source.gguf"
    corrupt_header(source, dest=store.model_path(MODEL_ID))
    async with start() as rig:
        error = await rig.refused(lambda r: m.Load(reply=r))
        assert (OperationFailed, "model_file_invalid") == (type(error), error.code)
        assert "impossible" in str(error)
        view = await rig.view()
        assert (State.DOWNLOADED, str(error)) == (view.state, view.error)
        assert [] == rig.spawn.specs
        assert [] == rig.gate.calls


async def test_worker_that_fails_to_start(autojump_clock: trio.abc.Clock, start: Start,
                                          store: Store, gguf: bytes) -> None:
    published(store, gguf)
    async with start() as rig:
        rig.spawn.error = WorkerStartError("tiny.gguf did not load within 300 s")
        error = await rig.refused(lambda r: m.Load(reply=r))
        assert (OperationFailed, "load_failed") == (type(error), error.code)
        assert "did not load within" in str(error)
        assert State.DOWNLOADED == (await rig.view()).state
        assert [("admit", MODEL_ID), ("release", MODEL_ID)] == rig.gate.calls


async def test_load_needs_memory(autojump_clock: trio.abc.Clock, start: Start, store: Store,
                                 gguf: bytes) -> None:
    """The gate hears what the model needs: the header's estimate (weights and more, shown in
    the view), or the catalog's `ram` when that says more."""
    published(store, gguf)
    async with start() as rig:
        view = await rig.ask(lambda r: m.Load(reply=r))
        [need] = rig.gate.needs
        assert len(gguf) < need
        assert view.memory_estimate is not None and len(gguf) < view.memory_estimate
    async with start(spec(ram=1 << 40)) as rig:
        await rig.ask(lambda r: m.Load(reply=r))
        assert [1 << 40] == rig.gate.needs


async def test_unload_while_loading(autojump_clock: trio.abc.Clock, start: Start,
                                    store: Store, gguf: bytes) -> None:
    published(store, gguf)
    async with start() as rig:
        rig.spawn.gate = trio.Event()
        answers: list[m.Reply] = []

        async def load() -> None:
            answers.append(await rig.ask(lambda r: m.Load(reply=r)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            await trio.testing.wait_all_tasks_blocked()
            assert State.LOADING == (await rig.view()).state
            view = await rig.view(lambda r: m.Unload(reply=r))
            assert (State.DOWNLOADED, None) == (view.state, view.error)
        [answer] = answers
        assert isinstance(answer, Conflict)
        assert [] == rig.spawn.workers
        assert [("admit", MODEL_ID), ("release", MODEL_ID)] == rig.gate.calls


async def test_stopping_the_actor_closes_its_worker(autojump_clock: trio.abc.Clock,
                                                    start: Start, store: Store,
                                                    gguf: bytes) -> None:
    published(store, gguf)
    async with start() as rig:
        await rig.view(lambda r: m.Load(reply=r))
    assert rig.spawn.workers[0].closed.is_set()


async def test_delete_unloads_and_removes_the_file(autojump_clock: trio.abc.Clock,
                                                   start: Start, store: Store,
                                                   gguf: bytes) -> None:
    published(store, gguf)
    async with start() as rig:
        await rig.view(lambda r: m.Load(reply=r))
        view = await rig.view(lambda r: m.Delete(reply=r))
        assert State.ABSENT == view.state
        assert rig.spawn.workers[0].closed.is_set()
        assert not rig.dest.exists()


# -- generation ------------------------------------------------------------------------------


async def test_generate_streams_from_the_loaded_worker(autojump_clock: trio.abc.Clock,
                                                       start: Start, store: Store,
                                                       gguf: bytes) -> None:
    published(store, gguf)
    async with start() as rig:
        refused = await rig.generate("Hello")
        assert isinstance(refused, Conflict) and "not_loaded" == refused.code
        await rig.view(lambda r: m.Load(reply=r))
        stream = await rig.generate("Hello 😀", GenerateParams(max_new_tokens=3))
        assert isinstance(stream, GenerationStream)
        assert ["Hel", "lo", " 😀"] == await collect(stream)
        assert stream.result is not None and "stop" == stream.result.finish_reason
        assert ("touch", MODEL_ID) == rig.gate.calls[-1]
        assert rig.spawn.workers[0].streams[0].closed


async def test_worker_killed_mid_stream_ends_it_with_an_error(
    autojump_clock: trio.abc.Clock, start: Start, store: Store, gguf: bytes
) -> None:
    published(store, gguf)
    async with start() as rig:
        await rig.view(lambda r: m.Load(reply=r))
        stream = await rig.generate("Hello")
        assert isinstance(stream, GenerationStream)
        pieces = []
        with pytest.raises(OperationFailed) as caught:
            async with stream:
                async for piece in stream:
                    pieces.append(piece)
                    rig.spawn.workers[0].die(-signal.SIGKILL)
        assert ["Hel"] == pieces
        assert "worker_exited" == caught.value.code
        await rig.spawn.workers[0].closed.wait()
        view = await rig.view()
        assert State.DOWNLOADED == view.state
        assert view.error is not None
        refused = await rig.generate("Hello")
        assert isinstance(refused, Conflict)


class Refusing:
    result = None

    async def __anext__(self) -> str:
        await trio.lowlevel.checkpoint()
        raise WorkerRequestError("the prompt is 900 tokens but the context holds 128")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_refused_prompt_is_invalid_input() -> None:
    """A prompt the worker refuses (too long for its context) is the caller's error (400)."""
    with pytest.raises(InvalidInput) as caught:
        await collect(GenerationStream(MODEL_ID, Refusing()))
    assert "generation_refused" == caught.value.code


# -- callers that give up, and the end of an actor ------------------------------------------


async def test_a_caller_that_gave_up_does_not_crash_the_actor(
    autojump_clock: trio.abc.Clock, start: Start, store: Store, gguf: bytes
) -> None:
    published(store, gguf)
    async with start() as rig:
        send, recv = trio.open_memory_channel[m.Reply](1)
        await recv.aclose()  # e.g. an HTTP client that disconnected
        await rig.actor.mailbox.send(m.GetSnapshot(reply=send))
        assert State.DOWNLOADED == (await rig.view()).state


async def test_commands_left_in_the_mailbox_are_answered_when_the_actor_stops(
    autojump_clock: trio.abc.Clock, start: Start
) -> None:
    first_send, first = trio.open_memory_channel[m.Reply](1)
    second_send, second = trio.open_memory_channel[m.Reply](1)
    async with start() as rig:
        rig.actor.mailbox.send_nowait(m.GetSnapshot(reply=first_send))
        rig.actor.mailbox.send_nowait(m.GetSnapshot(reply=second_send))
        # The block ends (the actor is cancelled) before the actor reads its mailbox: it
        # wakes up with the first command, then stops at its next checkpoint.
    with trio.fail_after(1):
        assert isinstance(await first.receive(), m.ModelView)
        with pytest.raises(trio.EndOfChannel):  # closed, not left waiting
            await second.receive()


async def test_an_update_replaces_the_file_of_a_loaded_model(autojump_clock: trio.abc.Clock,
                                                             start: Start, store: Store,
                                                             tmp_path: Path) -> None:
    """ImportFile with a spec (a Hub update): its file in updates/ published over the old file
    with its new pin in one step; a loaded model stays loaded (on the old file) and its worker
    is kept. A file that is not the one the update names is refused and left to the update."""
    from tests.gguf_factory import write_tiny_llama

    old = write_tiny_llama(tmp_path / "old.gguf", seed=1).read_bytes()
    new = write_tiny_llama(tmp_path / "new.gguf", seed=2).read_bytes()
    assert old != new
    published(store, old)
    pin = spec(custom=True, source="hf.co/u/r", revision="a" * 40, file="m.gguf",
               sha256=hashlib.sha256(old).hexdigest())
    store.write_record(pin)
    async with start(pin) as rig:
        await rig.view(lambda r: m.Load(reply=r))
        # The update was made from the record as it was when it started: a name changed
        # since stays.
        update = attrs.evolve(pin, name="the name before an edit", revision="b" * 40,
                              url=URL + "?b", sha256=hashlib.sha256(new).hexdigest())
        temp = file_update.staged_paths(store, update)[0]
        temp.parent.mkdir(exist_ok=True)
        temp.write_bytes(new)

        def ask(sha256: str) -> Callable[[trio.MemorySendChannel[m.Reply]], m.Command]:
            return lambda r: m.ImportFile(reply=r, temp=temp, sha256=sha256, spec=update)

        refused = await rig.ask(ask("0" * 64))  # not the bytes the update names
        assert isinstance(refused, InvalidInput) and "checksum_mismatch" == refused.code
        assert (old, True) == (store.model_path(MODEL_ID).read_bytes(), temp.exists())
        view = await rig.view(ask(update.sha256 or ""))
        expected = attrs.evolve(update, name=pin.name)
        assert (State.LOADED, expected, 1) == (view.state, view.spec, len(rig.spawn.specs))
        assert (new, False) == (store.model_path(MODEL_ID).read_bytes(), temp.exists())
        assert "b" * 40 == store.load_records()[0].revision
