"""Keep-alive through a real daemon with short durations: a model loaded on first use by /v1
is unloaded when idle for [runtime] keep_alive; a request's keep_alive 0 unloads it after the
request and -1 keeps it; an explicit load keeps it; a model whose request is still running
(its worker stopped with SIGSTOP) is not unloaded."""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.daemon import Daemon
from tests.e2e.conftest import DaemonFactory
from tests.e2e.test_openai import import_model
from tests.gguf_factory import write_tiny_llama


def complete(url: str, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "Hi",
                                                     "max_tokens": 2, "seed": 1, **extra},
                      timeout=120)


def view(url: str, model: str) -> dict[str, Any]:
    result: dict[str, Any] = httpx.get(f"{url}/model/{model}").json()
    return result


def expired(daemon: Daemon, count: int, timeout: float = 30) -> list[str]:
    """The models of the first `count` model_expired events, once there are that many."""
    deadline = time.monotonic() + timeout
    while len(daemon.events("model_expired")) < count:
        assert time.monotonic() < deadline, daemon.events("model_expired")
        time.sleep(0.02)
    return [e["model"] for e in daemon.events("model_expired")]


def test_keep_alive_end_to_end(make_daemon: DaemonFactory, tmp_path: Path) -> None:
    daemon = make_daemon(runtime={"keep_alive": "1s", "max_loaded": 3}).start()
    url = daemon.url
    a, b, c = (import_model(daemon, write_tiny_llama(tmp_path / f"{n}.gguf", seed=n), f"M{n}")
               for n in (1, 2, 3))

    # Loaded on first use: it expires after [runtime] keep_alive.
    started = time.time()
    assert 200 == complete(url, a).status_code
    shown = view(url, a)
    assert shown["loaded"] is True
    expires = dt.datetime.fromisoformat(shown["expiresAt"].replace("Z", "+00:00")).timestamp()
    assert started < expires < time.time() + 1.5
    daemon.wait_for("model_expired", model=a)
    assert (False, None) == (view(url, a)["loaded"], view(url, a).get("expiresAt"))

    # A custom model's own keep-alive: set on update, shown, checked.
    r = httpx.post(f"{url}/model/update", json={"id": a, "keepAlive": "soon"})
    assert (400, "invalid_body") == (r.status_code, r.json()["error"])
    assert "keepAlive" in r.json()["message"]
    r = httpx.post(f"{url}/models/create", json={"name": "K", "keepAlive": "2h"})
    assert (200, "2h") == (r.status_code, r.json()["keepAlive"])
    r = httpx.post(f"{url}/model/update", json={"id": a, "keepAlive": "1s"})
    assert (200, "1s") == (r.status_code, r.json()["keepAlive"])
    r = httpx.post(f"{url}/v1/completions", json={"model": a, "prompt": "x",
                                                  "keep_alive": "later"})
    assert (400, "keep_alive") == (r.status_code, r.json()["error"]["param"])

    # A request's keep_alive -1 keeps it; an explicit load keeps another.
    assert 200 == complete(url, a, keep_alive=-1).status_code
    assert view(url, a).get("expiresAt") is None
    r = httpx.post(f"{url}/model/{b}/load", timeout=120)
    assert 200 == r.status_code and r.json().get("expiresAt") is None

    # Keep_alive 0: unloaded right after the request.
    assert 200 == complete(url, c, keep_alive=0).status_code
    assert [a, c] == expired(daemon, 2)

    # A model with a request still running is not unloaded: c's worker is stopped mid-request.
    assert 200 == complete(url, c, keep_alive="1s").status_code
    pid = view(url, c)["pid"]
    os.kill(pid, signal.SIGSTOP)
    answer: list[httpx.Response] = []
    running = threading.Thread(target=lambda: answer.append(complete(url, c)))
    try:
        running.start()
        deadline = time.monotonic() + 30
        while not [m for m in httpx.get(f"{url}/status").json()["loaded"]
                   if m["id"] == c and m["slotsBusy"] == 1]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # a, kept before, now gets 1 s: it expires while c's request still runs.
        assert 200 == complete(url, a, keep_alive="1s").status_code
        assert [a, c, a] == expired(daemon, 3)
        assert view(url, c)["loaded"] is True
    finally:
        os.kill(pid, signal.SIGCONT)
        running.join(timeout=60)
    assert 200 == answer[0].status_code
    assert [a, c, a, c] == expired(daemon, 4)
    assert view(url, b)["loaded"] is True  # loaded explicitly: still there
    assert [] == daemon.events("request_crashed")
    assert 0 == daemon.stop()
