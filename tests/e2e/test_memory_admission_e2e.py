"""Memory admission through a real daemon with real workers: loading a model that does not fit
unloads the least recently used idle model first, and one that could not fit even then is
refused with 507 and the numbers, unloading nothing; one whose memory is held by a model in use
waits for it to be idle ([runtime] load_wait), then unloads it or is refused. The daemon is told
how much memory the machine has (MODELD_TEST_MEMORY_AVAILABLE, besides its workers' own)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from actors.memory import MEMORY_MARGIN, TEST_AVAILABLE_ENV
from tests.daemon import Daemon
from tests.gguf_factory import write_tiny_llama

MiB = 1024 * 1024


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    tiny = write_tiny_llama(tmp_path / "tiny.gguf", seed=21)
    url = "http://127.0.0.1:9/unused.gguf"  # the files are in place: nothing is downloaded
    catalog = [{"id": "a", "name": "A", "url": url}, {"id": "b", "name": "B", "url": url},
               {"id": "big", "name": "Big", "url": url, "ram": 64 * 1024 * MiB}]
    made = Daemon(tmp_path / "d", catalog, runtime={"max_loaded": 4, "load_wait": 2})
    (made.storage / "models").mkdir(parents=True)
    for model in ("a", "b", "big"):
        shutil.copy(tiny, made.storage / "models" / f"{model}.gguf")
    # Room for one tiny worker (about 35 MB) and the margin, not for two.
    made.start(env={TEST_AVAILABLE_ENV: str(MEMORY_MARGIN + 60 * MiB)})
    try:
        yield made
    finally:
        made.close()


def test_a_load_unloads_an_idle_model_or_is_refused_with_the_numbers(daemon: Daemon) -> None:
    with httpx.Client(base_url=daemon.url, timeout=60) as http:
        r = http.post("/model/a/load")
        assert 200 == r.status_code, r.text
        estimate = r.json()["memoryEstimate"]
        assert 20 * MiB < estimate < 60 * MiB  # a tiny model's worker, weights and buffers
        r = http.post("/model/b/load")
        assert 200 == r.status_code, r.text
        assert ["a"] == r.json()["evicted"]  # a was idle: unloaded to make room
        assert "downloaded" == http.get("/model/a").json()["state"]
        line = daemon.wait_for("model_evicted", model="a")
        assert "b" == line["to_make_room_for"]

        r = http.post("/model/big/load")
        assert (507, "insufficient_memory") == (r.status_code, r.json()["error"]), r.text
        message = r.json()["message"]
        assert "big needs ~68.72 GB of memory" in message, message
        assert "available after unloading idle models" in message
        assert "loaded" == http.get("/model/b").json()["state"]  # nothing unloaded in vain
        assert "downloaded" == http.get("/model/big").json()["state"]

        # b in use (its worker stopped mid-request): a's load waits for it, then is refused.
        pid = http.get("/model/b").json()["pid"]
        os.kill(pid, signal.SIGSTOP)
        done: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: done.append(http.post(
            "/v1/completions", json={"model": "b", "prompt": "Hi", "max_tokens": 2})))]
        try:
            threads[0].start()
            deadline = time.monotonic() + 30
            while not [m for m in http.get("/status").json()["loaded"]
                       if m["id"] == "b" and m["slotsBusy"] == 1]:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            started = time.monotonic()
            r = http.post("/model/a/load")
            assert (507, "insufficient_memory") == (r.status_code, r.json()["error"]), r.text
            assert "b in use after waiting 2 s" in r.json()["message"]
            assert 2 <= time.monotonic() - started < 10
            # Again, and b's request ends meanwhile: b, idle, is unloaded to make room.
            threads.append(threading.Thread(target=lambda: done.append(
                http.post("/model/a/load"))))
            threads[1].start()
            while len(daemon.events("load_waiting")) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        finally:
            os.kill(pid, signal.SIGCONT)
            for thread in threads:
                thread.join(timeout=60)
        completion, load = done
        assert 200 == completion.status_code, completion.text
        assert (200, ["b"]) == (load.status_code, load.json().get("evicted")), load.text
        assert {"model": "a", "models_in_use": ["b"], "seconds": 2} == {
            k: daemon.events("load_waiting")[1][k] for k in ("model", "models_in_use", "seconds")}
