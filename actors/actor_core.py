"""The state of one model's actor and the few things every part of it does: the view it
answers reads with, moving its state, publishing its progress (actors/model.py runs it)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import attrs
import structlog
import trio

from actors import messages as m
from actors.attempts import (
    DownloadAttempt,
    DownloadEnded,
    FactsRead,
    LoadAttempt,
    LoadEnded,
    WorkerExited,
)
from actors.disk import DISK_MARGIN, FreeSpace, free_bytes
from actors.download_queue import DownloadQueue
from actors.gguf import GGUFInfo, inspect_gguf
from actors.keepalive import DEFAULT, Expired, KeepAlive, KeepAliveArg, parse_keep_alive
from actors.load_checks import RememberedInspect, memory_need, read_facts
from actors.ports import Fetcher, LoadGate, Spawner, WorkerHandle
from actors.progress import Broadcaster, progress_broadcaster
from actors.runtimes import preview_runtime
from actors.spec import ModelSpec
from actors.split import model_file, whole_set
from actors.state import Event, State, transition
from actors.store import Store

log = structlog.get_logger("modeld.actor")


@attrs.frozen
class ActorSettings:
    connections: int = 8
    retries: int = 6
    stall_timeout: float = 30.0
    allow_http: bool = False
    allow_private: bool = False  # [download] allow_private
    min_rate: float = 0.0  # [download] min_rate
    default_runtime: str = "auto"
    parallel: int = 2
    keep_alive: float = 900.0  # seconds a model loaded on first use stays loaded when idle
    min_free: int = DISK_MARGIN  # bytes of disk a download leaves free ([storage] min_free)
    # Extra headers for a download from this url (a Hub token for the Hub's own host: see
    # supervisor/hub.py HubAccess.headers_for); the download drops them past a redirect.
    headers_for: Callable[[str], tuple[tuple[str, str], ...]] = lambda _url: ()
    # Writes a catalog model's pin (supervisor/pins.py; blocking): a Hub update publishes its
    # files and the new pin in one step (actors/file_update.py).
    write_pin: Callable[[ModelSpec], None] = lambda _spec: None


Message = (m.Command | m.Generate | m.Embed | DownloadEnded | LoadEnded | WorkerExited
           | FactsRead | Expired)


class ActorCore:
    """What an actor holds; only ModelActor's loop changes it (see actors/model.py)."""

    def __init__(
        self,
        spec: ModelSpec,
        store: Store,
        *,
        settings: ActorSettings,
        fetch: Fetcher,
        spawn: Spawner,
        gate: LoadGate,
        inspect: Callable[[Path], GGUFInfo] = inspect_gguf,
        progress: Broadcaster[m.Progress] | None = None,
        free_space: FreeSpace = free_bytes,
        downloads: DownloadQueue | None = None,
    ) -> None:
        self.spec = spec
        self.state = State.ABSENT
        self.error: str | None = None
        # The registry hands over the model's broadcaster, which outlives any one actor: the
        # subscribers of a crashed actor's download hear the truth from the next one.
        self.progress = progress or progress_broadcaster(spec.id)
        self._store = store
        self._settings = settings
        self._fetch = fetch
        self._spawn = spawn
        self._gate = gate
        self._inspect = RememberedInspect(inspect)
        self._free_space = free_space
        # Shared by every model's actor ([download] max_active); alone: no limit.
        self._downloads = downloads or DownloadQueue(sys.maxsize)
        self._send, self._inbox = trio.open_memory_channel[Message](64)
        self._nursery: trio.Nursery | None = None
        self._download: DownloadAttempt | None = None
        self._last_download_ended: trio.Event | None = None
        self._load: LoadAttempt | None = None
        self._worker: WorkerHandle | None = None
        self._facts: m.FileFacts | None = None
        self._partial = 0
        self._load_seconds: float | None = None
        self._keep = KeepAlive(on_idle=lambda: gate.idle(spec.id))
        self._load_keep: KeepAliveArg = DEFAULT  # the keep-alive the load in progress gives

    @property
    def mailbox(self) -> trio.MemorySendChannel[Message]:
        return self._send

    @property
    def dest(self) -> Path:
        return model_file(self._store, self.spec)  # a split model's: its first part

    def view(self) -> m.ModelView:
        return m.ModelView(
            spec=self.spec,
            state=self.state,
            error=self.error,
            partial_bytes=self._partial_now(),
            load_seconds=self._load_seconds,
            facts=self._facts,
            worker_pid=None if self._worker is None else self._worker.pid,
            runtime=self._worker.info.runtime
            if self._worker is not None
            else preview_runtime(
                self.spec.runtime or self._settings.default_runtime,
                self._facts.architecture if self._facts else None,
                split=bool(self.spec.parts),
            ),
            slots=1 if self._worker is None else self._worker.info.parallel,
            context_length=None if self._worker is None else self._worker.info.context_length,
            memory_estimate=self._memory_estimate(),
            **self._keep.view_fields(),
        )

    def _partial_now(self) -> int:
        """Bytes of the partial: while a download writes, what it wrote so far."""
        now = self.progress.value
        if self._download is not None and now.status == "IN-PROGRESS":
            return max(now.bytes, 0)
        return self._partial

    def _memory_estimate(self) -> int | None:
        """What the model takes loaded (its worker's real context and slots), or would."""
        worker, facts = self._worker, self._facts
        if worker is not None:
            spec = attrs.evolve(self.spec, context_length=worker.info.context_length,
                                parallel=worker.info.parallel)
            return memory_need(spec, facts, worker.info.runtime, self._settings.parallel)
        runtime = preview_runtime(self.spec.runtime or self._settings.default_runtime,
                                  facts.architecture if facts else None,
                                  split=bool(self.spec.parts))
        return memory_need(self.spec, facts, runtime, self._settings.parallel)

    def _keep_for(self, keep_alive: KeepAliveArg) -> float:
        """Seconds; DEFAULT (a load on first use): the model's own keep-alive, else
        [runtime] keep_alive."""
        if keep_alive is not DEFAULT:
            return float(keep_alive)
        if self.spec.keep_alive is not None:
            return parse_keep_alive(self.spec.keep_alive)
        return self._settings.keep_alive

    def _move(self, event: Event) -> None:
        before = self.state
        self.state = transition(before, event)
        if self.state is not before:
            log.info(
                "state_changed",
                model=self.spec.id,
                **{"from": before.value, "to": self.state.value, "cause": event.value},
            )

    def _publish(self, **changes: object) -> None:
        """Publish a progress snapshot of this model: `m.Progress` fields, the rest defaults."""
        progress = attrs.evolve(m.Progress(model=self.spec.id), **changes)  # type: ignore[arg-type]
        self.progress.publish(progress)

    async def _refresh_facts(self) -> None:
        """Read the published file's header; a bad file is reported here and refused at load."""
        facts = await trio.to_thread.run_sync(read_facts, self._inspect, self.dest, self.spec.id)
        self._facts = whole_set(facts, self.spec)
