"""Prometheus metrics (GET /metrics), with prometheus_client.

What the actors do is counted from the log events they emit (the documented event table is
the one record of it; `observe` is fed by a structlog processor in the daemon process), so the
actors know nothing of metrics. The HTTP layer counts requests and generations itself; gauges
(loaded models, downloads, worker memory) are read from the registry's views at scrape time,
never waiting on an actor. Labels stay bounded: route templates, never raw paths; model ids
only of catalog and registered models; error codes, which are a fixed set in the code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from actors import messages as m
from actors.state import State

try:
    from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
except ImportError:  # before 0.22: the classic format was the latest
    from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE

__all__ = ["CONTENT_TYPE", "Metrics"]

OTHER = "other"  # the label of a model id that is no (longer a) known model
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DOWNLOAD_ENDS = {"download_completed": "completed", "download_failed": "failed",
                 "download_cancelled": "cancelled"}

Views = Callable[[], list[m.ModelView]]
Resident = Callable[[int | None], int | None]
Known = Callable[[str], bool]


class Metrics:
    """Every metric of one daemon, in its own CollectorRegistry (never the global one)."""

    def __init__(self, views: Views = list, resident: Resident = lambda _pid: None,
                 known: Known = lambda _id: False) -> None:
        self.registry = CollectorRegistry()
        self._known = known
        r = self.registry
        self.download_bytes = Counter(
            "modeld_download_bytes", "Bytes downloaded into model files", ["model"], registry=r)
        self.downloads = Counter(
            "modeld_downloads", "Download attempts that ended, by outcome and reason",
            ["model", "outcome", "reason"], registry=r)
        self.loads = Counter("modeld_loads", "Loads that ended, by outcome and reason",
                             ["model", "outcome", "reason"], registry=r)
        self.load_seconds = Histogram("modeld_load_seconds", "Seconds a successful load took",
                                      ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.evictions = Counter("modeld_evictions", "Models unloaded to make room for "
                                 "another ([runtime] max_loaded, or memory)", ["model"],
                                 registry=r)
        self.expiries = Counter("modeld_expiries", "Models unloaded after their keep-alive",
                                ["model"], registry=r)
        self.worker_crashes = Counter("modeld_worker_crashes",
                                      "Worker processes that died on their own", ["model"],
                                      registry=r)
        self.actor_restarts = Counter("modeld_actor_restarts",
                                      "Model actors restarted after a failure", ["model"],
                                      registry=r)
        self.requests = Counter("modeld_http_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram(
            "modeld_http_request_duration_seconds", "Seconds until a response's head",
            ["method", "route"], buckets=REQUEST_BUCKETS, registry=r)
        self.generated_tokens = Counter("modeld_generated_tokens", "Tokens generated",
                                        ["model"], registry=r)
        self.prompt_tokens = Counter("modeld_prompt_tokens", "Prompt tokens evaluated",
                                     ["model"], registry=r)
        self.time_to_first_token = Histogram(
            "modeld_time_to_first_token_seconds", "Seconds from a generation request to its "
            "first piece of text", ["model"], buckets=TTFT_BUCKETS, registry=r)
        r.register(_Gauges(views, resident))
        self._started_at: dict[str, int] = {}

    def model(self, model_id: str | None) -> str:
        """The label for a model id: itself when it is a known model, else `other`."""
        if model_id and self._known(model_id):
            return model_id
        return OTHER

    def observe(self, event: dict[str, Any]) -> None:
        """Count what a log event says happened (called for every event; never raises)."""
        name = event.get("event")
        model = event.get("model")
        if not isinstance(name, str) or not isinstance(model, str):
            return
        if name == "download_started":
            self._started_at[model] = _int(event.get("bytes"))
        elif name in DOWNLOAD_ENDS:
            done = _int(event.get("bytes")) - self._started_at.pop(model, 0)
            label = self.model(model)
            self.download_bytes.labels(label).inc(max(0, done))
            reason = str(event.get("code") or DOWNLOAD_ENDS[name])
            self.downloads.labels(label, DOWNLOAD_ENDS[name], reason).inc()
        elif name == "model_loaded":
            label = self.model(model)
            self.loads.labels(label, "loaded", "loaded").inc()
            self.load_seconds.labels(label).observe(float(event.get("load_seconds") or 0.0))
        elif name == "load_failed":
            self.loads.labels(self.model(model), "failed",
                              str(event.get("code") or "load_failed")).inc()
        elif name == "model_evicted":
            self.evictions.labels(self.model(model)).inc()
        elif name == "model_expired":
            self.expiries.labels(self.model(model)).inc()
        elif name == "worker_exited":
            self.worker_crashes.labels(self.model(model)).inc()
        elif name == "actor_restarted":
            self.actor_restarts.labels(self.model(model)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class _Gauges(Collector):
    """What is true now, read from the registry's views at scrape time."""

    def __init__(self, views: Views, resident: Resident) -> None:
        self._views = views
        self._resident = resident

    def collect(self) -> Iterable[Metric]:
        views = self._views()
        states = GaugeMetricFamily("modeld_models", "Models by state", labels=["state"])
        counts = {state.value: 0 for state in State}
        for view in views:
            counts[view.state.value] += 1
        for state, count in counts.items():
            states.add_metric([state], count)
        loaded = [v for v in views if v.state is State.LOADED]
        yield states
        yield GaugeMetricFamily("modeld_loaded_models", "Models loaded in a worker",
                                value=len(loaded))
        yield GaugeMetricFamily("modeld_active_downloads", "Downloads running",
                                value=sum(v.state is State.DOWNLOADING for v in views))
        memory = GaugeMetricFamily("modeld_worker_resident_bytes",
                                   "Resident memory of each loaded model's worker",
                                   labels=["model"])
        for view in loaded:
            rss = self._resident(view.worker_pid)
            if rss is not None:
                memory.add_metric([view.spec.id], rss)
        yield memory
