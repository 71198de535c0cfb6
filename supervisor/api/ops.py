"""What operators and their tools ask the daemon: GET /health (readiness), GET /metrics
(Prometheus), GET /status (JSON)."""

from __future__ import annotations

import enum
import time

from quart import Response
from quart_trio import QuartTrio

from supervisor.api.app import json_reply
from supervisor.api.guard import without_token
from supervisor.metrics import CONTENT_TYPE, Metrics
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
