"""What operators see, through one real daemon with a token: GET /health, GET /metrics (parsed
by prometheus_client's own parser) and GET /status, after a real download from a real origin,
a load into a real worker, a generation and a failed download."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import Daemon
from tests.gguf_factory import write_tiny_llama
from tests.origin import Origin, run_origin_in_thread

TOKEN = "ops-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Ops:
    def __init__(self, daemon: Daemon, origin: Origin, tiny: bytes) -> None:
        self.daemon = daemon
        self.origin = origin
        self.tiny = tiny
        self.client = httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60)


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    tmp = tmp_path_factory.mktemp("ops")
    tiny = write_tiny_llama(tmp / "tiny.gguf", seed=5).read_bytes()
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    with run_origin_in_thread() as origin:
        origin.add("/tiny.gguf", tiny)
        catalog: list[dict[str, Any]] = [
            {"id": "tiny", "name": "Tiny", "url": origin.url("/tiny.gguf"),
             "sha256": hashlib.sha256(tiny).hexdigest(), "size": len(tiny)},
            # Nothing is served there: its download fails at once.
            {"id": "missing", "name": "Missing", "url": origin.url("/missing.gguf")},
        ]
        daemon = Daemon(tmp / "d", catalog, server={"token_file": str(token_file)},
                        download={"retries": 0})
        daemon.start()
        try:
            yield Ops(daemon, origin, tiny)
            assert 0 == daemon.stop()
        finally:
            daemon.close()


def test_health_answers_without_the_token(ops: Ops) -> None:
    url = ops.daemon.url
    r = httpx.get(f"{url}/health")
    assert (200, {"status": "ok"}) == (r.status_code, r.json())
    assert "application/json" == r.headers["content-type"]
    # It reveals nothing else: the rest still needs the token.
    assert 401 == httpx.get(f"{url}/models").status_code
    assert 401 == httpx.get(f"{url}/health/x").status_code
    # The Host guard applies as everywhere.
    assert 403 == httpx.get(f"{url}/health", headers={"Host": "evil.example"}).status_code
    assert 403 == httpx.get(f"{url}/health", headers={"Origin": "http://evil.example"}
                            ).status_code


def scrape(ops: Ops) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of GET /metrics, by name and labels, read by prometheus_client's parser."""
    r = ops.client.get("/metrics")
    assert 200 == r.status_code, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_state(ops: Ops, model: str, state: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view: dict[str, Any] = ops.client.get(f"/model/{model}").json()
        if view["state"] == state:
            return view
        assert time.monotonic() < deadline, view
        ops.daemon.wait_for("state_changed", timeout=deadline - time.monotonic(),
                            model=model, to=state)


def test_metrics_count_a_download_a_load_a_generation_and_a_failure(ops: Ops) -> None:
    assert 401 == httpx.get(f"{ops.daemon.url}/metrics").status_code  # token-protected
    before = scrape(ops)
    assert 0 == value(before, "modeld_loaded_models")

    assert 200 == ops.client.post("/model/tiny/download").status_code
    wait_state(ops, "tiny", "downloaded")
    assert 200 == ops.client.post("/model/missing/download").status_code
    ops.daemon.wait_for("download_failed", model="missing")
    r = ops.client.post("/model/tiny/load")
    assert 200 == r.status_code, r.text
    r = ops.client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi",
                                                 "max_tokens": 4, "seed": 1})
    assert 200 == r.status_code, r.text
    usage = r.json()["usage"]
    ops.client.get("/model/no-such-model")  # 410, under its route template

    after = scrape(ops)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert len(ops.tiny) == moved("modeld_download_bytes_total", model="tiny")
    assert 1 == moved("modeld_downloads_total", model="tiny", outcome="completed",
                      reason="completed")
    failed = {k: v for k, v in after.items() if k[0] == "modeld_downloads_total"
              and ("outcome", "failed") in k[1]}
    assert 1 == sum(failed.values()), failed
    assert {("model", "missing")} <= set(next(iter(failed))[1])
    assert 1 == moved("modeld_loads_total", model="tiny", outcome="loaded", reason="loaded")
    assert 1 == moved("modeld_load_seconds_count", model="tiny")
    assert 0 < moved("modeld_load_seconds_sum", model="tiny")
    assert 1 == value(after, "modeld_loaded_models")
    assert 0 < value(after, "modeld_worker_resident_bytes", model="tiny")
    assert 1 == value(after, "modeld_models", state="loaded")
    assert usage["completion_tokens"] == moved("modeld_generated_tokens_total", model="tiny")
    assert usage["prompt_tokens"] == moved("modeld_prompt_tokens_total", model="tiny")
    assert 1 == moved("modeld_time_to_first_token_seconds_count", model="tiny")
    assert 1 == moved("modeld_http_requests_total", method="POST",
                      route="/model/<model>/load", status="200")
    assert 1 == moved("modeld_http_requests_total", method="GET", route="/model/<model>",
                      status="410")
    assert 1 == moved("modeld_http_request_duration_seconds_count", method="POST",
                      route="/v1/completions")
    # Bounded labels: no raw path, no unknown model id anywhere.
    labels = {v for (_name, pairs) in after for _k, v in pairs}
    assert "no-such-model" not in labels
    assert not [v for v in labels if v.startswith("/model/") and "<" not in v]
