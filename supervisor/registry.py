"""The registry: owns the actor nursery, one supervised task per model, and the load policy.

The facade reaches actors only through `Registry.call`, which sends a command with a reply
channel and waits under `trio.fail_after`.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import attrs
import structlog
import trio

from actors import file_update
from actors import messages as m
from actors.download import download_file
from actors.download_queue import DownloadQueue
from actors.embedding import EmbeddingJob
from actors.errors import Conflict, ModelError, ModelNotFound, Unavailable
from actors.generation import GenerationStream
from actors.keepalive import DEFAULT, KeepAliveArg, parse_keep_alive
from actors.model import ActorSettings, ModelActor
from actors.ports import Fetcher, Spawner, WorkerHandle
from actors.progress import Broadcaster, progress_broadcaster
from actors.runtimes import LLAMA_CPP
from actors.spec import ModelSpec, is_valid_id
from actors.state import State
from actors.store import Store
from actors.worker import GenerateParams, open_worker
from supervisor.chat_renderer import ChatRenderer, check_template_for_llama_cpp
from supervisor.config import CatalogEntry, Config
from supervisor.gate import LruGate
from supervisor.hub import HubAccess
from supervisor.hub_updates import HubUpdates
from supervisor.pins import apply_pins, write_pin
from supervisor.wire import slug_id

log = structlog.get_logger("modeld.registry")

# A crashed actor restarts after 1 s, then 2, 4, ... up to 5 minutes while it keeps failing;
# one that ran for a minute before it failed starts the count again.
FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 300.0
HEALTHY_RUN = 60.0
STARTING_AT_ONCE = 32  # actors reading their state from disk together at start-up
CommandFactory = Callable[[trio.MemorySendChannel[m.Reply]], m.Command]
R = TypeVar("R")


def spec_from_catalog(entry: CatalogEntry) -> ModelSpec:
    return ModelSpec(
        id=entry.id,
        name=entry.name,
        url=entry.url,
        sha256=entry.sha256,
        size=entry.size,
        model_type=entry.model_type,
        version=entry.version,
        description=entry.description,
        quantization=entry.quantization,
        foundation=entry.foundation,
        type=entry.type,
        usage=entry.usage,
        ram=entry.ram,
        context_length=entry.context_length,
        runtime=entry.runtime,
        parallel=entry.parallel,
        keep_alive=entry.keep_alive,
        custom=False,
        source=entry.source,
    )


@attrs.define(eq=False)
class _Entry:
    """One model under supervision: the actor now running it, and what outlives that actor
    (its progress broadcaster; the failure that stopped the last one)."""

    actor: ModelActor
    progress: Broadcaster[m.Progress]
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    stopped: trio.Event = attrs.field(factory=trio.Event)
    failure: str | None = None  # set while the actor is down, until a new one serves

    def view(self) -> m.ModelView:
        view = self.actor.view()
        if self.failure is None:
            return view
        # Down: nothing is loaded or downloading, whatever the dead actor last knew.
        settled = State.DOWNLOADED if view.state.value in _HAS_FILE else State.ABSENT
        return attrs.evolve(view, state=settled, error=self.failure, worker_pid=None)


_HAS_FILE = {State.DOWNLOADED.value, State.LOADING.value, State.LOADED.value, "unloading"}


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def restart_delay(failures: int) -> float:
    """Seconds before restarting an actor that has failed `failures` times in a row (>= 1)."""
    return min(MAX_RESTART_DELAY, FIRST_RESTART_DELAY * 2.0 ** (failures - 1))


def describe_failure(exc: BaseException) -> str:
    """What stopped an actor, and what the operator can do, in one sentence."""
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return (
            f"modeld cannot use this model's files: {exc.strerror or exc}{where}; check that "
            "the storage dir and its files belong to modeld's user and can be read and "
            "written, then wait for the retry or restart modeld"
        )
    return f"this model's supervisor failed: {exc or type(exc).__name__}; retrying"


def _worker_spawner(config: Config, renderer: ChatRenderer) -> Spawner:
    async def spawn(path: Path, spec: ModelSpec, chat_template: str | None) -> WorkerHandle:
        if spec.runtime == LLAMA_CPP and chat_template is not None:
            await check_template_for_llama_cpp(renderer, chat_template)
        return await open_worker(
            path,
            model_type=spec.model_type,
            context_length=spec.context_length or 0,
            threads=config.runtime.threads_per_worker(),
            load_timeout=config.runtime.load_timeout,
            runtime=spec.runtime or config.runtime.default_runtime,
            parallel=spec.parallel or config.runtime.parallel,
        )

    return spawn


class Registry:
    def __init__(
        self,
        config: Config,
        store: Store,
        nursery: trio.Nursery,
        *,
        fetch: Fetcher = download_file,
        spawn: Spawner | None = None,
        hub: HubAccess | None = None,
    ) -> None:
        self.config = config
        # The Hub and modeld's token for it (supervisor/hub.py): resolution and downloads.
        self.hub = hub or HubAccess(endpoint=config.hub.endpoint)
        self.updates = HubUpdates(self)  # updates of source-backed models, updateAvailable
        self.store = store
        self._nursery = nursery
        self._entries: dict[str, _Entry] = {}
        self._catalog_ids: set[str] = set()
        self._lock = trio.Lock()
        self.gate = LruGate(self, config.runtime.max_loaded, wait=config.runtime.load_wait)
        self._settings = ActorSettings(
            connections=config.download.connections,
            retries=config.download.retries,
            stall_timeout=config.download.stall_timeout,
            allow_http=config.download.allow_http,
            allow_private=config.download.allow_private,
            min_rate=config.download.min_rate,
            default_runtime=config.runtime.default_runtime,
            parallel=config.runtime.parallel,
            keep_alive=parse_keep_alive(config.runtime.keep_alive),
            min_free=config.storage.min_free,
            headers_for=self.hub.headers_for,
            write_pin=functools.partial(write_pin, store.root),
        )
        self._fetch = fetch
        self.downloads = DownloadQueue(config.download.max_active)
        # Chat templates render here, off the event loop (for /v1/chat and the load check).
        self.renderer = ChatRenderer()
        self._spawn = spawn or _worker_spawner(config, self.renderer)

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run `fn(*args)` in the registry's nursery: work on behalf of models that outlives
        a request (a Hub update's download), ended with the registry."""
        self._nursery.start_soon(fn, *args)

    def ids(self) -> list[str]:
        return list(self._entries)

    def knows(self, model_id: str) -> bool:
        """Whether `model_id` is a catalog or registered model now."""
        return model_id in self._entries

    def _entry(self, model_id: str) -> _Entry:
        entry = self._entries.get(model_id)
        if entry is None:
            raise ModelNotFound(f"no model with id {model_id!r}")
        return entry

    def broadcaster(self, model_id: str) -> Broadcaster[m.Progress]:
        """The model's download progress, for subscribers (it outlives actor restarts)."""
        return self._entry(model_id).progress

    def view(self, model_id: str) -> m.ModelView:
        """The model now, read without waiting on its actor. Raises ModelNotFound."""
        return self._entry(model_id).view()

    def views(self) -> list[m.ModelView]:
        """Every model now, never waiting on a busy actor, never leaving one out."""
        return [entry.view() for entry in list(self._entries.values())]

    def _new_actor(self, spec: ModelSpec, progress: Broadcaster[m.Progress]) -> ModelActor:
        return ModelActor(
            spec,
            self.store,
            settings=self._settings,
            fetch=self._fetch,
            spawn=self._spawn,
            gate=self.gate,
            progress=progress,
            downloads=self.downloads,
        )

    async def _start_all(self, specs: list[ModelSpec]) -> None:
        """Start the actors, a few reading their state from disk at a time (in order of the
        list, which is also the order of /models)."""
        limit = trio.CapacityLimiter(STARTING_AT_ONCE)

        async def start(spec: ModelSpec, task_status: trio.TaskStatus[None]) -> None:
            async with limit:
                task_status.started()
                await self._start(spec)

        async with trio.open_nursery() as starting:
            for spec in specs:
                await starting.start(start, spec)

    async def _start(self, spec: ModelSpec) -> None:
        progress = progress_broadcaster(spec.id)
        entry = _Entry(actor=self._new_actor(spec, progress), progress=progress)
        self._entries[spec.id] = entry
        await self._nursery.start(self._supervise, entry)

    async def _supervise(self, entry: _Entry, *, task_status: trio.TaskStatus[None]) -> None:
        """Run the model's actor; restart it (state re-read from disk) when it fails.

        Reports started once the first actor serves, or once it has failed before serving (the
        model then shows its failure: start-up never waits on a broken model). A model that
        keeps failing is restarted less and less often (`restart_delay`).
        """
        reported = False
        failures = 0
        try:
            with entry.scope:
                while True:
                    began = trio.current_time()
                    try:
                        async with trio.open_nursery() as nursery:
                            await nursery.start(entry.actor.run)
                            entry.failure = None
                            if not reported:
                                task_status.started()
                                reported = True
                        return
                    except Exception as exc:
                        entry.failure = describe_failure(_first_leaf(exc))
                        log.exception("actor_crashed", model=entry.actor.spec.id)
                        self._tell_subscribers(entry)
                    if not reported:
                        task_status.started()
                        reported = True
                    healthy = trio.current_time() - began >= HEALTHY_RUN
                    failures = 1 if healthy else failures + 1
                    delay = restart_delay(failures)
                    log.info("actor_restart_scheduled", model=entry.actor.spec.id,
                             delay=delay, failures=failures)
                    await trio.sleep(delay)
                    entry.actor = self._new_actor(entry.actor.spec, entry.progress)
                    log.info("actor_restarted", model=entry.actor.spec.id, failures=failures)
        finally:
            entry.stopped.set()

    @staticmethod
    def _tell_subscribers(entry: _Entry) -> None:
        """A download's subscribers are told it failed; a resumed one starts a new stream."""
        last = entry.progress.value
        if not last.terminal:
            entry.progress.publish(
                attrs.evolve(last, status="FAILED", error=entry.failure,
                             bytes_per_second=None, eta_seconds=None)
            )

    async def _ask(
        self,
        model_id: str,
        make: Callable[[trio.MemorySendChannel[R | ModelError]], m.Command | m.Generate | m.Embed],
    ) -> R:
        """Send a message with a reply channel to a model's actor and wait for the answer.

        Raises ModelNotFound for an unknown id, Unavailable when the actor stops first, and
        the actor's own ModelError when that is its answer.
        """
        entry = self._entry(model_id)
        send, recv = trio.open_memory_channel[R | ModelError](1)
        try:
            await entry.actor.mailbox.send(make(send))
            async with recv:
                result = await recv.receive()
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
            raise Unavailable("the model's actor stopped; try again") from None
        if isinstance(result, ModelError):
            raise result
        return result

    async def call(self, model_id: str, make: CommandFactory) -> m.ModelView:
        """Send a command to a model's actor and wait for its answer (the caller bounds it)."""
        return await self._ask(model_id, make)

    async def generate(
        self, model_id: str, prompt: str, params: GenerateParams,
        keep_alive: KeepAliveArg = DEFAULT,
    ) -> GenerationStream:
        """Borrow a loaded model for one prompt (the caller bounds the wait for the actor).

        The stream's text comes straight from the model's worker; nothing is generated until
        it is iterated, and it must be closed (``async with``). Raises ModelNotFound, Conflict
        when the model is not loaded, Unavailable when its actor stops first.
        """
        return await self._ask(
            model_id, lambda reply: m.Generate(prompt=prompt, params=params, reply=reply,
                                               keep_alive=keep_alive)
        )

    async def embedder(self, model_id: str, texts: list[str],
                       keep_alive: KeepAliveArg = DEFAULT) -> EmbeddingJob:
        """Borrow a loaded model for the embeddings of texts (`await job.run()`). Raises
        ModelNotFound, Conflict when the model is not loaded, Unavailable when its actor
        stops first."""
        return await self._ask(model_id, lambda reply: m.Embed(texts=texts, reply=reply,
                                                                keep_alive=keep_alive))

    async def create(
        self, spec: ModelSpec, *, ids: tuple[str, ...] = (),
        reuse: Callable[[ModelSpec], bool] | None = None,
    ) -> m.ModelView:
        """Register a custom model under a new id (spec.id is ignored): record, then actor.
        Raises Conflict (too_many_models) at `[storage] max_custom_models`."""
        async with self._lock:
            # The first of `ids` that is free, unless a model that `reuse` accepts holds one
            # first (then that model is the answer); else a new id from the name.
            for candidate in ids:
                taken = self._entries.get(candidate)
                if taken is None:
                    model_id = candidate
                    break
                if reuse is not None and reuse(taken.actor.spec):
                    return taken.view()
            else:
                model_id = slug_id(spec.name, uuid.uuid4().hex)
                while model_id in self._entries:
                    model_id = slug_id(spec.name, uuid.uuid4().hex)
            limit = self.config.storage.max_custom_models
            if len(self._entries) - len(self._catalog_ids) >= limit:
                raise Conflict(
                    f"modeld holds {limit} custom models, the most [storage] max_custom_models "
                    "allows; delete some, or raise the limit", code="too_many_models")
            assert is_valid_id(model_id)
            spec = attrs.evolve(spec, id=model_id)
            await trio.to_thread.run_sync(self.store.write_record, spec)
            await self._start(spec)
            log.info("model_created", model=model_id)
        return self.view(model_id)

    async def forget_cut_import(self, model_id: str) -> None:
        """An upload cut off before its whole file came: a custom model with no url, no Hub
        source and no file is useless, and goes (as after a crash mid-upload: the Store's
        start-up sweep)."""
        if not self.knows(model_id):
            return
        view = self.view(model_id)
        spec = view.spec
        if not spec.custom or spec.url or spec.source or view.state is not State.ABSENT:
            return
        try:
            await self.delete(model_id)
        except ModelError:
            return
        log.warning("import_interrupted", model=model_id)

    async def delete(self, model_id: str) -> None:
        """Unload, cancel, remove files; for custom models also the record and the actor."""
        self.updates.cancel(model_id, discard=True)
        async with self._lock:
            await self.call(model_id, lambda r: m.Delete(reply=r))
            if model_id in self._catalog_ids:
                return
            entry = self._entries.pop(model_id)
            await trio.to_thread.run_sync(self.store.delete_record, model_id)
            entry.scope.cancel()
            await entry.stopped.wait()
            log.info("model_deleted", model=model_id)


def _keep_spec(store: Store, spec: ModelSpec) -> None:
    """A spec's record (custom model) or pin (catalog model); blocking."""
    if spec.custom:
        store.write_record(spec)
    else:
        write_pin(store.root, spec)


async def serve_registry(
    config: Config,
    *,
    fetch: Fetcher = download_file,
    spawn: Spawner | None = None,
    store: Store | None = None,
    hub: HubAccess | None = None,
    task_status: trio.TaskStatus[Registry] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start one actor per model (catalog, then custom records); run until cancelled.

    The store is opened from the config unless one is given."""
    if store is None:
        path = config.storage.path()
        store = await trio.to_thread.run_sync(functools.partial(Store.open, path))
    # A Hub update's publish cut short by a crash is finished before any record is read.
    await trio.to_thread.run_sync(file_update.finish_interrupted, store,
                                  functools.partial(_keep_spec, store))
    records = await trio.to_thread.run_sync(store.load_records)
    async with trio.open_nursery() as nursery:
        registry = Registry(config, store, nursery, fetch=fetch, spawn=spawn, hub=hub)
        specs = [spec_from_catalog(entry) for entry in config.models]
        # Catalog models with a Hub source: the commit and file of their first download.
        specs = await trio.to_thread.run_sync(apply_pins, store.root, specs)
        registry._catalog_ids.update(spec.id for spec in specs)
        for spec in records:
            if spec.id in registry._catalog_ids:
                log.warning("record_shadowed", model=spec.id, reason="a catalog model has this id")
                continue
            specs.append(spec)
        log.info("registry_starting", models=len(specs))
        await registry._start_all(specs)
        log.info("registry_started", models=len(registry._entries), storage=str(store.root))
        nursery.start_soon(registry.updates.watch)
        task_status.started(registry)
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await registry.renderer.aclose()
