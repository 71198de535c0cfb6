"""Memory admission through a real daemon with real workers: loading a model that does not fit
unloads the least recently used idle model first, and one that could not fit even then is
refused with 507 and the numbers, unloading nothing. The daemon is told how much memory the
machine has (MODELD_TEST_MEMORY_AVAILABLE, besides its workers' own)."""

from __future__ import annotations

import shutil
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
    made = Daemon(tmp_path / "d", catalog, runtime={"max_loaded": 4})
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
