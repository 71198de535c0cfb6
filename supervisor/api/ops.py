"""What operators and their tools ask the daemon: GET /health (readiness), GET /metrics
(Prometheus)."""

from __future__ import annotations

import enum

from quart import Response
from quart_trio import QuartTrio

from supervisor.api.app import json_reply
from supervisor.api.guard import without_token
from supervisor.metrics import CONTENT_TYPE, Metrics


class Phase(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    STOPPING = "stopping"


class Readiness:
    """Where the daemon is in its life: the daemon moves it, GET /health reports it."""

    def __init__(self, phase: Phase = Phase.SERVING) -> None:
        self.phase = phase


def register_ops(app: QuartTrio, readiness: Readiness, metrics: Metrics) -> None:
    @app.get("/health")
    @without_token
    async def health() -> Response:
        if readiness.phase is Phase.SERVING:
            return json_reply({"status": "ok"})
        return json_reply({"status": readiness.phase.value}, 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), content_type=CONTENT_TYPE)
