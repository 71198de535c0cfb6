"""The daemon's stdout is JSON lines an operator can filter (`journalctl -u modeld -o cat | jq`):
every line an object with ts, level and event, one event for each thing worth knowing, and
never a secret."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import httpx
import psutil

from tests.e2e.conftest import DaemonFactory
from tests.gguf_factory import write_tiny_llama
from tests.origin import run_origin_in_thread

TOKEN = "tok-9f3a1c7e5b2d4a6f8e0c"
LEVELS = {"debug", "info", "warning", "error", "critical"}
BODY_MARKER = "body-marker-4d2e9a"


def test_every_line_is_json_with_the_events_that_matter(make_daemon: DaemonFactory,
                                                         tmp_path: Path) -> None:
    tiny = write_tiny_llama(tmp_path / "tiny.gguf")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with run_origin_in_thread() as origin:
        origin.add("/flaky.gguf", tiny.read_bytes())
        flaky = origin.faults("/flaky.gguf")
        flaky.status, flaky.status_requests, flaky.retry_after = 503, 1, "0"
        daemon = make_daemon(
            [{"id": "flaky", "name": "Flaky", "url": origin.url("/flaky.gguf")}],
            server={"token_file": str(token_file)},
        ).start()
        proc = daemon.proc
        assert proc is not None and proc.stderr is not None
        api = httpx.Client(base_url=daemon.url, timeout=60,
                           headers={"authorization": f"Bearer {TOKEN}"})

        # A download that needs a retry, then a load.
        assert 200 == api.post("/model/flaky/download").status_code
        daemon.wait_for("download_completed", model="flaky")
        loaded = api.post("/model/flaky/load")
        assert (200, True) == (loaded.status_code, loaded.json()["loaded"])

        # A worker that dies.
        worker = psutil.Process(daemon.wait_for("model_loaded", model="flaky")["pid"])
        worker.kill()
        exited = daemon.wait_for("worker_exited", model="flaky")

        # Refused requests: a foreign Host (DNS rebinding), a wrong or missing token. The
        # token goes along the wrong ways too; it must never reach a log line.
        refused = api.post("/models/create", headers={"host": "evil.example"},
                           json={"name": BODY_MARKER})
        assert (403, "host_not_allowed") == (refused.status_code, refused.json()["error"])
        bad = [
            httpx.get(f"{daemon.url}/models", headers={"authorization": "Bearer wrong"}),
            httpx.get(f"{daemon.url}/models"),
            httpx.get(f"{daemon.url}/models", headers={"authorization": TOKEN}),
            httpx.get(f"{daemon.url}/models", headers={"authorization": f"Token {TOKEN}"}),
            httpx.get(f"{daemon.url}/models?token={TOKEN}"),
            httpx.get(f"{daemon.url}/model/{TOKEN}"),
            httpx.post(f"{daemon.url}/models/create", json={"name": TOKEN}),
        ]
        assert [401] * len(bad) == [r.status_code for r in bad]
        assert all(TOKEN not in r.text for r in bad)
        assert 200 == api.get("/models").status_code
        assert 0 == daemon.stop()
    stderr = proc.stderr.read().decode("utf-8", "replace")

    for raw in daemon.raw_lines:
        line = json.loads(raw)
        assert isinstance(line, dict), raw
        assert {"ts", "level", "event"} <= line.keys(), raw
        assert line["level"] in LEVELS, raw
        assert dt.datetime.fromisoformat(line["ts"]).utcoffset() == dt.timedelta(0), raw
    everything = "\n".join(daemon.raw_lines) + stderr
    assert TOKEN not in everything
    assert BODY_MARKER not in everything

    moves = [(e["from"], e["to"]) for e in daemon.events("state_changed") if e["model"] == "flaky"]
    assert [("absent", "downloading"), ("downloading", "downloaded"), ("downloaded", "loading"),
            ("loading", "loaded")] == moves[:4]
    assert len(moves) == 5 and "loaded" == moves[4][0]  # the worker's death moves it on

    retry = daemon.events("download_retry")[0]
    assert ("flaky", 1) == (retry["model"], retry["attempt"])
    assert "503" in retry["reason"]
    assert isinstance(retry["bytes"], int)

    loaded_event = daemon.events("model_loaded")[0]
    assert isinstance(loaded_event["load_seconds"], float)
    assert 0 <= loaded_event["load_seconds"] < 60

    assert (-9, "error") == (exited["returncode"], exited["level"])
    assert "signal 9" in exited["reason"]

    host_refused = [e for e in daemon.events("request_refused")
                    if e.get("code") == "host_not_allowed"]
    assert 1 == len(host_refused)
    assert ("/models/create", "warning") == (host_refused[0]["path"], host_refused[0]["level"])
    assert "Host" in host_refused[0]["reason"]
    unauthorized = [e for e in daemon.events("request_refused") if e.get("code") == "unauthorized"]
    assert len(bad) == len(unauthorized)

