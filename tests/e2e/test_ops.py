"""What operators see, through one real daemon with a token: GET /health, GET /metrics (parsed
by prometheus_client's own parser) and GET /status, after a real download from a real origin,
a load into a real worker, a generation and a failed download."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import ROOT, Daemon
from tests.gguf_factory import gguf_of_size, write_tiny_llama
from tests.origin import Origin, run_origin_in_thread

TOKEN = "ops-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HUGE = 10**15  # bytes


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
    big = gguf_of_size(8_000_000, seed=9)
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    with run_origin_in_thread() as origin:
        origin.add("/tiny.gguf", tiny)
        origin.add("/slow.gguf", big)
        origin.faults("/slow.gguf").throttle = 64 * 1024
        catalog: list[dict[str, Any]] = [
            {"id": "tiny", "name": "Tiny", "url": origin.url("/tiny.gguf"),
             "sha256": hashlib.sha256(tiny).hexdigest(), "size": len(tiny)},
            # Nothing is served there: its download fails at once.
            {"id": "missing", "name": "Missing", "url": origin.url("/missing.gguf")},
            # Larger than any disk: refused before a byte.
            {"id": "huge", "name": "Huge", "url": origin.url("/huge.gguf"), "size": HUGE},
            # Served slowly: a download that runs while the test looks.
            {"id": "slow", "name": "Slow", "url": origin.url("/slow.gguf"), "size": len(big)},
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


def ensure_loaded(ops: Ops, model: str) -> None:
    if ops.client.get(f"/model/{model}").json()["state"] == "absent":
        assert 200 == ops.client.post(f"/model/{model}/download").status_code
        wait_state(ops, model, "downloaded")
    r = ops.client.post(f"/model/{model}/load")
    assert 200 == r.status_code, r.text


def modeld_cli(ops: Ops, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "--url", ops.daemon.url, "--token", TOKEN, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL)


def test_status_and_the_ps_and_status_commands(ops: Ops) -> None:
    assert 401 == httpx.get(f"{ops.daemon.url}/status").status_code
    ensure_loaded(ops, "tiny")
    assert 200 == ops.client.post("/model/slow/download").status_code
    try:
        ops.daemon.wait_for("download_started", model="slow")
        status = ops.client.get("/status").json()
        assert {"version", "uptimeSeconds", "loaded", "downloads", "storage",
                "memory"} <= set(status)
        assert 0 < status["uptimeSeconds"]
        [tiny] = [m for m in status["loaded"] if m["id"] == "tiny"]
        view = ops.client.get("/model/tiny").json()
        assert ("loaded", view["pid"], view["runtime"]) == (tiny["state"], tiny["pid"],
                                                             tiny["runtime"])
        assert 0 < tiny["rssBytes"]
        assert view["maxTokens"]["total"] == tiny["contextLength"]
        assert 0 == tiny["slotsBusy"]
        [slow] = [d for d in status["downloads"] if d["id"] == "slow"]
        assert 8_000_000 == slow["total"]
        assert 0 <= slow["bytes"] < slow["total"]
        assert slow["queuePosition"] is None  # it runs: nothing waits in line before it
        deadline = time.monotonic() + 30
        while not slow["connections"]:  # how many move its bytes, once they move
            assert time.monotonic() < deadline, slow
            time.sleep(0.05)
            [slow] = [d for d in ops.client.get("/status").json()["downloads"]
                      if d["id"] == "slow"]
        assert 1 <= slow["connections"] <= 8  # [download] connections
        assert 0 < slow["bytes"] < slow["total"]
        assert len(ops.tiny) <= status["storage"]["usedBytes"]
        assert 0 < status["storage"]["freeBytes"]
        assert 0 < status["memory"]["availableBytes"]

        ps = modeld_cli(ops, "ps")
        assert 0 == ps.returncode, ps.stderr
        header, *rows = ps.stdout.splitlines()
        assert header.split() == ["ID", "RUNTIME", "PID", "MEMORY", "CONTEXT", "BUSY", "IDLE",
                                  "UNLOADS"]
        [row] = [r.split() for r in rows if r.startswith("tiny ")]
        assert ["tiny", tiny["runtime"], str(tiny["pid"])] == row[:3]
        as_json = json.loads(modeld_cli(ops, "ps", "--json").stdout)
        assert ["tiny"] == [m["id"] for m in as_json]
        full = modeld_cli(ops, "status")
        assert 0 == full.returncode, full.stderr
        assert f"modeld {status['version']}" in full.stdout
        assert "slow" in full.stdout and "downloads: 1" in full.stdout
        assert "loaded: 1" in full.stdout
    finally:
        ops.client.post("/model/slow/download/cancel")


def test_a_file_that_does_not_fit_is_refused_before_any_byte(ops: Ops) -> None:
    ops.origin.add("/huge.gguf", ops.tiny)
    r = ops.client.post("/model/huge/download")
    assert (507, "insufficient_storage") == (r.status_code, r.json()["error"]), r.text
    assert f"({HUGE} bytes)" in r.json()["message"]
    assert [] == ops.origin.seen("/huge.gguf")
    assert "absent" == ops.client.get("/model/huge").json()["state"]
    assert not list((ops.daemon.storage / "models").glob("huge*"))

    # An upload that says it is larger than the free space: refused before its body is read.
    model = ops.client.post("/models/create", json={"name": "Big upload"}).json()["id"]
    files = sorted(ops.daemon.storage.rglob("*"))
    conn = http.client.HTTPConnection("127.0.0.1", ops.daemon.port, timeout=30)
    try:
        conn.putrequest("PUT", f"/model/{model}/file")
        for name, value in {**AUTH, "Content-Type": "application/octet-stream",
                            "Content-Length": str(HUGE)}.items():
            conn.putheader(name, value)
        conn.endheaders()
        conn.send(b"GGUF")
        answer = conn.getresponse()
        body = json.loads(answer.read())
    finally:
        conn.close()
    assert (507, "insufficient_storage") == (answer.status, body["error"])
    assert files == sorted(ops.daemon.storage.rglob("*"))  # no temp file, no partial

    du = modeld_cli(ops, "du")
    assert 0 == du.returncode, du.stderr
    lines = du.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "FILE", "PARTIAL"]
    [tiny] = [line.split() for line in lines if line.startswith("tiny ")]
    assert tiny[1] in ("downloaded", "loaded")
    assert "free" in lines[-1]
    as_json = json.loads(modeld_cli(ops, "du", "--json").stdout)
    assert len(ops.tiny) == next(m for m in as_json["models"] if m["id"] == "tiny")["bytes"]
    assert 0 < as_json["freeBytes"]


def test_prune_lists_then_removes_only_what_no_model_owns(ops: Ops) -> None:
    models = ops.daemon.storage / "models"
    stray = models / "deleted-model.gguf.partial"
    stray.write_bytes(b"\0" * 4096)
    (models / "deleted-model.gguf.partial.json").write_text("{}")
    before = sorted(p.name for p in models.iterdir())

    dry = modeld_cli(ops, "prune", "--dry-run")
    assert 0 == dry.returncode, dry.stderr
    assert str(stray) in dry.stdout and "model 'deleted-model' no longer exists" in dry.stdout
    assert "would remove 2 files" in dry.stdout
    assert before == sorted(p.name for p in models.iterdir())  # a dry run removes nothing

    assert 401 == httpx.post(f"{ops.daemon.url}/storage/prune").status_code
    r = ops.client.post("/storage/prune", json={"dryRun": "yes"})
    assert (400, "invalid_body") == (r.status_code, r.json()["error"])
    done = json.loads(modeld_cli(ops, "prune", "--json").stdout)
    assert (False, 4096 + 2) == (done["dryRun"], done["bytes"])
    assert {str(stray), f"{stray}.json"} == {f["path"] for f in done["files"]}
    assert sorted(set(before) - {stray.name, f"{stray.name}.json"}) == sorted(
        p.name for p in models.iterdir())
    assert "nothing to prune" in modeld_cli(ops, "prune").stdout
