"""Who may load now: `[runtime] max_loaded` and memory. Admitting a model unloads the least
recently used idle models first, as many as it takes for the count and for the memory the
model's estimate needs (actors/memory.py); a model in use is never unloaded. What cannot be
made room for at once waits, when only models in use stand in the way, up to `[runtime]
load_wait` seconds for them to be idle; then it is refused: 503 `all_busy` when every other
model is in use, 507 `insufficient_memory` with the numbers when even unloading every idle
model would not free enough."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import structlog
import trio

from actors import messages as m
from actors.errors import Conflict, InsufficientMemory, ModelNotFound, Unavailable
from actors.memory import (
    MEMORY_MARGIN,
    MemoryProbe,
    available_memory,
    gb,
    plan_admission,
    resident_bytes,
)
from actors.state import State

if TYPE_CHECKING:
    from supervisor.registry import Registry

log = structlog.get_logger("modeld.registry")

EVICT_WAIT = 30.0  # seconds an idle model may take to unload
LOAD_WAIT = 30.0  # seconds a load waits for models in use to be idle ([runtime] load_wait)


class LruGate:
    """max_loaded and memory: admitting one more model unloads the least recently used idle
    ones first."""

    def __init__(self, registry: Registry, max_loaded: int,
                 memory: MemoryProbe = available_memory, wait: float = LOAD_WAIT) -> None:
        self._registry = registry
        self._max = max_loaded
        self._memory = memory
        self._wait = wait
        self._order: OrderedDict[str, None] = OrderedDict()
        self._lock = trio.Lock()
        self._evicted: dict[str, list[str]] = {}  # per model: whom its last admit unloaded
        self._needs: dict[str, int] = {}  # admitted models' estimates, while they load
        self._changed = trio.Event()  # set when a model is released or idle

    async def admit(self, model_id: str, need: int) -> None:
        """Make room for `model_id`, which will take about `need` bytes: unload the least
        recently used idle models until both max_loaded and memory allow it. When only models
        in use stand in the way, wait up to `wait` seconds for them to be idle (the lock is
        not held meanwhile: a load that fits goes ahead), then refuse."""
        deadline = trio.current_time() + self._wait
        evicted: list[str] = []
        self._evicted[model_id] = evicted
        logged = False
        while True:
            can_wait = trio.current_time() < deadline
            async with self._lock:
                blockers = await self._make_room(model_id, need, evicted, can_wait)
            if not blockers:
                return
            if not logged:
                log.info("load_waiting", model=model_id, models_in_use=blockers,
                         seconds=self._wait)
                logged = True
            with trio.move_on_at(deadline):
                while all(k in self._order and self._in_use(k) for k in blockers):
                    await self._changed.wait()

    async def _make_room(self, model_id: str, need: int, evicted: list[str],
                         can_wait: bool) -> list[str]:
        """Evict for `model_id` and admit it (returns []), or return the models in use that
        stand in the way when waiting for them could help and `can_wait`; else refuse."""
        busy: set[str] = set()  # their actors refused an eviction: a request began
        while True:
            others = [k for k in self._order if k != model_id]
            if len(others) < self._max:
                break
            idle = [k for k in others if k not in busy and not self._in_use(k)]
            if not idle:
                if can_wait:
                    return others
                raise Unavailable(
                    f"every loaded model is in use, so {model_id} cannot be loaded now "
                    f"([runtime] max_loaded){self._waited()}; try again when a request ends",
                    code="all_busy")
            await self._evict(idle[0], model_id, evicted, busy)
        while True:
            available = await trio.to_thread.run_sync(self._memory)
            available -= self._loading_needs(model_id)
            idle_rss: list[tuple[str, int]] = []
            in_use: list[tuple[str, int]] = []
            for k in self._order:
                if k != model_id:
                    busy_now = k in busy or self._in_use(k)
                    (in_use if busy_now else idle_rss).append((k, self._resident(k)))
            plan = plan_admission(need, available, idle_rss)
            if plan is None:
                if can_wait and plan_admission(need, available, idle_rss + in_use) is not None:
                    return [k for k, _ in in_use]
                freeable = sum(rss for _, rss in idle_rss)
                after = max(0, available + freeable - MEMORY_MARGIN)
                held = (f"; {', '.join(k for k, _ in in_use)} in use{self._waited()}"
                        if in_use else "")
                raise InsufficientMemory(
                    f"{model_id} needs ~{gb(need)} of memory to load, and "
                    f"{gb(after)} are available after unloading idle models "
                    f"({gb(max(0, available - MEMORY_MARGIN))} now, {gb(MEMORY_MARGIN)} "
                    f"kept free){held}; unload models, free memory or lower its context")
            if not plan:
                break
            await self._evict(plan[0], model_id, evicted, busy)
        self._order[model_id] = None
        self._order.move_to_end(model_id)
        self._needs[model_id] = need
        return []

    def _waited(self) -> str:
        return (f" after waiting {self._wait:g} s for one to be idle ([runtime] load_wait)"
                if self._wait else "")

    async def _evict(self, victim: str, model_id: str, evicted: list[str],
                     busy: set[str]) -> None:
        with trio.move_on_after(EVICT_WAIT):
            try:
                # Its actor releases it here (`release`) once its worker is gone.
                await self._registry.call(victim, lambda r: m.Unload(reply=r, if_idle=True))
            except Conflict:
                busy.add(victim)  # a request began meanwhile: it stays
                return
            except (ModelNotFound, Unavailable):
                self._order.pop(victim, None)  # no actor left to hold memory
        log.info("model_evicted", model=victim, to_make_room_for=model_id)
        evicted.append(victim)
        if victim in self._order:
            raise Unavailable(f"could not unload {victim} to make room for {model_id}; try "
                              "again")

    def _loading_needs(self, model_id: str) -> int:
        """The estimates of the other models admitted and still loading: the memory they are
        about to take is not yet gone from what the system reports."""
        total = 0
        for other, need in list(self._needs.items()):
            try:
                loading = self._registry.view(other).state is State.LOADING
            except ModelNotFound:
                loading = False
            if other != model_id and loading:
                total += need
            elif not loading:
                del self._needs[other]
        return total

    def _resident(self, model_id: str) -> int:
        """What unloading `model_id` would give back: its worker's resident memory."""
        try:
            view = self._registry.view(model_id)
        except ModelNotFound:
            return 0
        return resident_bytes(view.worker_pid) or view.memory_estimate or 0

    def _in_use(self, model_id: str) -> bool:
        try:
            return self._registry.view(model_id).busy > 0
        except ModelNotFound:
            return False

    def release(self, model_id: str) -> None:
        self._order.pop(model_id, None)
        self._needs.pop(model_id, None)
        self._wake()

    def idle(self, model_id: str) -> None:
        """`model_id`'s last request ended: loads waiting for a model in use look again."""
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def take_evicted(self, model_id: str) -> list[str]:
        """The models unloaded to make room when `model_id` was last admitted (once)."""
        return self._evicted.pop(model_id, [])

    def touch(self, model_id: str) -> None:
        if model_id in self._order:
            self._order.move_to_end(model_id)
