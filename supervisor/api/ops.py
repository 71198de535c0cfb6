"""What operators and their tools ask the daemon: GET /health (readiness), GET /metrics
(Prometheus), GET /status (JSON), POST /storage/prune (files no model owns)."""

from __future__ import annotations

import enum
import time
from typing import Any

import trio
from quart import Response
from quart_trio import QuartTrio

from actors.errors import InvalidInput
from supervisor.api.app import json_reply
from supervisor.api.guard import without_token
from supervisor.api.models import refuse_body
from supervisor.metrics import CONTENT_TYPE, Metrics
from supervisor.prune import find_strays, remove_strays
from supervisor.registry import Registry
from supervisor.status import status_json


class Phase(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    STOPPING = "stopping"


class Readiness:
    """Where the daemon is in its life: the daemon moves it, GET /health reports it."""

    def __init__(self, phase: Phase = Phase.SERVING) -> None:
        self.phase = phase
        self.started = time.monotonic()


def register_ops(app: QuartTrio, registry: Registry, readiness: Readiness,
                 metrics: Metrics) -> None:
    @app.get("/health")
    @without_token
    async def health() -> Response:
        if readiness.phase is Phase.SERVING:
            return json_reply({"status": "ok"})
        return json_reply({"status": readiness.phase.value}, 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), content_type=CONTENT_TYPE)

    @app.get("/status")
    async def status() -> Response:
        return json_reply(await status_json(registry, readiness.started))

    @app.post("/storage/prune")
    async def prune() -> Response:
        dry_run = _dry_run(await refuse_body())
        strays = await trio.to_thread.run_sync(find_strays, registry.store.root, registry.ids)
        if not dry_run:
            strays = await trio.to_thread.run_sync(remove_strays, strays)
        return json_reply({"dryRun": dry_run, "files": [s.to_json() for s in strays],
                           "bytes": sum(s.bytes for s in strays)})


def _dry_run(body: Any) -> bool:
    """`{"dryRun": true}` lists without removing; no body removes."""
    if body is None:
        return False
    if not isinstance(body, dict) or set(body) - {"dryRun"} or not isinstance(
            body.get("dryRun", False), bool):
        raise InvalidInput('the body is {"dryRun": true|false}', code="invalid_body")
    return bool(body.get("dryRun", False))
