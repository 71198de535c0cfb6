"""The registry: owns the actor nursery, one supervised task per model, and the load policy.

The facade reaches actors only through `Registry.call`, which sends a command with a reply
channel and waits under `trio.fail_after`.
"""

from __future__ import annotations

import functools
import itertools
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import attrs
import structlog
import trio

from actors import messages as m
from actors.download import download_file
from actors.errors import ModelError, ModelNotFound, Unavailable
from actors.model import (
    ActorSettings,
    Fetcher,
    Generate,
    GenerationStream,
    ModelActor,
    Spawner,
    WorkerHandle,
)
from actors.progress import Broadcaster
from actors.spec import ModelSpec, is_valid_id
from actors.store import Store
from actors.worker import GenerateParams, open_worker
from supervisor.config import CatalogEntry, Config
from supervisor.wire import slug_id

log = structlog.get_logger("modeld.registry")

RESTART_DELAYS = (0.1, 0.5, 2.0, 5.0)
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
        custom=False,
    )


@attrs.define(eq=False)
class _Entry:
    actor: ModelActor
    scope: trio.CancelScope
    stopped: trio.Event = attrs.field(factory=trio.Event)


class LruGate:
    """max_loaded: admitting one more model unloads the least recently used ones first."""

    def __init__(self, registry: Registry, max_loaded: int) -> None:
        self._registry = registry
        self._max = max_loaded
        self._order: OrderedDict[str, None] = OrderedDict()
        self._lock = trio.Lock()

    async def admit(self, model_id: str) -> None:
        async with self._lock:
            while True:
                others = [k for k in self._order if k != model_id]
                if len(others) < self._max:
                    break
                victim = others[0]
                log.info("model_evicted", model=victim, to_make_room_for=model_id)
                with trio.move_on_after(30):
                    try:
                        # Its actor releases it here (`release`) once its worker is gone.
                        await self._registry.call(victim, lambda r: m.Unload(reply=r))
                    except (ModelNotFound, Unavailable):
                        self._order.pop(victim, None)  # no actor left to hold memory
                if victim in self._order:
                    raise Unavailable(
                        f"could not unload {victim} to make room for {model_id} "
                        "([runtime] max_loaded); try again"
                    )
            self._order[model_id] = None
            self._order.move_to_end(model_id)

    def release(self, model_id: str) -> None:
        self._order.pop(model_id, None)

    def touch(self, model_id: str) -> None:
        if model_id in self._order:
            self._order.move_to_end(model_id)


def _worker_spawner(config: Config) -> Spawner:
    async def spawn(path: Path, spec: ModelSpec) -> WorkerHandle:
        return await open_worker(
            path,
            model_type=spec.model_type,
            context_length=spec.context_length or 0,
            threads=config.runtime.thread_count(),
            load_timeout=config.runtime.load_timeout,
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
    ) -> None:
        self.config = config
        self.store = store
        self._nursery = nursery
        self._entries: dict[str, _Entry] = {}
        self._catalog_ids: set[str] = set()
        self._lock = trio.Lock()
        self.gate = LruGate(self, config.runtime.max_loaded)
        self._settings = ActorSettings(
            connections=config.download.connections,
            retries=config.download.retries,
            stall_timeout=config.download.stall_timeout,
            allow_http=config.download.allow_http,
            load_timeout=config.runtime.load_timeout,
        )
        self._fetch = fetch
        self._spawn = spawn or _worker_spawner(config)

    def ids(self) -> list[str]:
        return list(self._entries)

    def is_custom(self, model_id: str) -> bool:
        return model_id in self._entries and model_id not in self._catalog_ids

    def broadcaster(self, model_id: str) -> Broadcaster[m.Progress]:
        """The model's download progress, for subscribers."""
        entry = self._entries.get(model_id)
        if entry is None:
            raise ModelNotFound(f"no model with id {model_id!r}")
        return entry.actor.progress

    def _new_actor(self, spec: ModelSpec) -> ModelActor:
        return ModelActor(
            spec,
            self.store,
            settings=self._settings,
            fetch=self._fetch,
            spawn=self._spawn,
            gate=self.gate,
        )

    async def _start(self, spec: ModelSpec) -> None:
        entry = _Entry(actor=self._new_actor(spec), scope=trio.CancelScope())
        self._entries[spec.id] = entry
        await self._nursery.start(self._supervise, entry)

    async def _supervise(self, entry: _Entry, *, task_status: trio.TaskStatus[None]) -> None:
        """Run the model's actor; restart it (state re-read from disk) if it crashes."""
        started = False
        try:
            with entry.scope:
                for attempt in itertools.count():
                    try:
                        if not started:
                            await entry.actor.run(task_status=task_status)
                        else:
                            await entry.actor.run()
                        return
                    except Exception:
                        log.exception("actor_crashed", model=entry.actor.spec.id)
                    finally:
                        started = True
                    delay = RESTART_DELAYS[min(attempt, len(RESTART_DELAYS) - 1)]
                    await trio.sleep(delay)
                    entry.actor = self._new_actor(entry.actor.spec)
                    log.info("actor_restarted", model=entry.actor.spec.id, attempt=attempt + 1)
        finally:
            entry.stopped.set()

    async def _ask(
        self,
        model_id: str,
        make: Callable[[trio.MemorySendChannel[R | ModelError]], m.Command | Generate],
    ) -> R:
        """Send a message with a reply channel to a model's actor and wait for the answer.

        Raises ModelNotFound for an unknown id, Unavailable when the actor stops first, and
        the actor's own ModelError when that is its answer.
        """
        entry = self._entries.get(model_id)
        if entry is None:
            raise ModelNotFound(f"no model with id {model_id!r}")
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
        self, model_id: str, prompt: str, params: GenerateParams
    ) -> GenerationStream:
        """Borrow a loaded model for one prompt (the caller bounds the wait for the actor).

        The stream's text comes straight from the model's worker; nothing is generated until
        it is iterated, and it must be closed (``async with``). Raises ModelNotFound, Conflict
        when the model is not loaded, Unavailable when its actor stops first.
        """
        return await self._ask(
            model_id, lambda reply: Generate(prompt=prompt, params=params, reply=reply)
        )

    async def snapshot_all(self) -> list[m.ModelView]:
        views = []
        for model_id in list(self._entries):
            with trio.move_on_after(10):
                try:
                    views.append(await self.call(model_id, lambda r: m.GetSnapshot(reply=r)))
                except (ModelNotFound, Unavailable):
                    continue
        return views

    async def create(self, spec: ModelSpec) -> m.ModelView:
        """Register a custom model under a new id (spec.id is ignored): record, then actor."""
        async with self._lock:
            model_id = slug_id(spec.name, uuid.uuid4().hex)
            while model_id in self._entries:
                model_id = slug_id(spec.name, uuid.uuid4().hex)
            assert is_valid_id(model_id)
            spec = attrs.evolve(spec, id=model_id)
            await trio.to_thread.run_sync(self.store.write_record, spec)
            await self._start(spec)
            log.info("model_created", model=model_id)
        return await self.call(model_id, lambda r: m.GetSnapshot(reply=r))

    async def delete(self, model_id: str) -> None:
        """Unload, cancel, remove files; for custom models also the record and the actor."""
        async with self._lock:
            await self.call(model_id, lambda r: m.Delete(reply=r))
            if model_id in self._catalog_ids:
                return
            entry = self._entries.pop(model_id)
            await trio.to_thread.run_sync(self.store.delete_record, model_id)
            entry.scope.cancel()
            await entry.stopped.wait()
            log.info("model_deleted", model=model_id)


async def serve_registry(
    config: Config,
    *,
    fetch: Fetcher = download_file,
    spawn: Spawner | None = None,
    task_status: trio.TaskStatus[Registry] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start one actor per model (catalog, then custom records); run until cancelled."""
    store = await trio.to_thread.run_sync(functools.partial(Store.open, config.storage.path()))
    records = await trio.to_thread.run_sync(store.load_records)
    async with trio.open_nursery() as nursery:
        registry = Registry(config, store, nursery, fetch=fetch, spawn=spawn)
        for entry in config.models:
            registry._catalog_ids.add(entry.id)
            await registry._start(spec_from_catalog(entry))
        for spec in records:
            if spec.id in registry._entries:
                log.warning("record_shadowed", model=spec.id, reason="a catalog model has this id")
                continue
            await registry._start(spec)
        log.info("registry_started", models=len(registry._entries), storage=str(store.root))
        task_status.started(registry)
        await trio.sleep_forever()
