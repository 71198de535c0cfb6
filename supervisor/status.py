"""GET /status: the daemon at a glance, read from the registry's views (never waiting on an
actor), one disk statfs and one memory reading."""

from __future__ import annotations

import datetime as dt
import shutil
import time
from typing import Any

import psutil
import trio

from actors import messages as m
from actors.memory import resident_bytes
from actors.state import State
from supervisor import __version__
from supervisor.registry import Registry
from supervisor.wire import iso_utc

_HAS_FILE = (State.DOWNLOADED, State.LOADING, State.LOADED, State.UNLOADING)


def iso_epoch(when: float | None) -> str | None:
    return None if when is None else iso_utc(dt.datetime.fromtimestamp(when, dt.UTC))


def loaded_json(view: m.ModelView) -> dict[str, Any]:
    return {
        "id": view.spec.id,
        "state": view.state.value,
        "runtime": view.runtime,
        "pid": view.worker_pid,
        "rssBytes": resident_bytes(view.worker_pid),
        "contextLength": view.context_length,
        "slots": view.slots,
        "slotsBusy": view.busy,
        "idleSince": iso_epoch(view.idle_since),
        "keepAliveSeconds": view.keep_alive,
        "expiresAt": iso_epoch(view.expires_at),
    }


def download_json(progress: m.Progress) -> dict[str, Any]:
    return {
        "id": progress.model,
        "status": progress.status,
        "bytes": progress.bytes,
        "total": progress.total,
        "percentage": progress.percentage,
        "rate": progress.bytes_per_second,
        "eta": progress.eta_seconds,
        "retrying": progress.retrying,
        "connections": progress.connections,
        "queuePosition": progress.queue_position,
    }


def model_bytes(views: list[m.ModelView]) -> int:
    """Bytes the models' files take: published files and partial downloads."""
    total = 0
    for view in views:
        if view.state in _HAS_FILE and view.facts is not None:
            total += view.facts.size
        total += view.partial_bytes
    return total


async def status_json(registry: Registry, started: float) -> dict[str, Any]:
    """`started`: time.monotonic() when the daemon started."""
    views = registry.views()
    disk = await trio.to_thread.run_sync(shutil.disk_usage, registry.store.root)
    memory = psutil.virtual_memory()
    loaded = [v for v in views if v.state in (State.LOADING, State.LOADED, State.UNLOADING)]
    # Running and waiting downloads, a Hub update's (of a downloaded model) too.
    downloads = [registry.broadcaster(v.spec.id).value for v in views
                 if v.state is State.DOWNLOADING or registry.updates.running(v.spec.id)]
    return {
        "version": __version__,
        "uptimeSeconds": round(time.monotonic() - started, 3),
        "models": len(views),
        "loaded": [loaded_json(v) for v in loaded],
        "downloads": [download_json(p) for p in downloads],
        "storage": {"dir": str(registry.store.root), "usedBytes": model_bytes(views),
                    "freeBytes": disk.free, "totalBytes": disk.total},
        "memory": {"availableBytes": memory.available, "totalBytes": memory.total},
    }
