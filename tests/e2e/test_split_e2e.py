"""A split GGUF model (llama.cpp's `name-00001-of-00003.gguf`) end to end: pulled from the fake
Hub (tests/hub.py) by the real command line into a real daemon, every part verified, one
progress over the set, published only whole, loaded by llama.cpp from its first part and
generating, refused by ctransformers, found whole after a restart, updated to a newer set
(downloaded beside it, the old set loadable until the new one is published with its revision),
and deleted with all its parts while another update downloads (nothing of it left)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import attrs
import httpx

from tests.e2e.conftest import DaemonFactory
from tests.e2e.test_cli import start_pull
from tests.gguf_factory import split_gguf, write_tiny_llama
from tests.hub import FakeHub, open_fake_hub, split_files
from tests.origin import Faults

MODEL = "hf-user-split-q8_0"
THROTTLE = 400_000  # bytes per second per connection: the set of ~470 KB takes over a second


def test_split_model_pull_load_refuse_delete(make_daemon: DaemonFactory, tmp_path: Path) -> None:
    parts = split_gguf(write_tiny_llama(tmp_path / "whole.gguf", seed=5), 3)
    files = split_files("tiny-Q8_0", parts)
    names = list(files)
    total = sum(map(len, parts))
    with open_fake_hub() as hub:
        commit = hub.publish("user/split", {**files, "tiny.Q4_0.gguf": parts[0]})
        for name in names:
            hub.cdn.resources[f"/repos/user/split/{commit}/{name}"].faults = Faults(
                throttle=THROTTLE)
        daemon = make_daemon(hub={"endpoint": hub.endpoint}, runtime={"threads": 1}).start()
        url, models = daemon.url, daemon.storage / "models"
        paths = [models / f"{MODEL}-{k:05d}-of-00003.gguf" for k in (1, 2, 3)]

        # A part named is its whole set; the progress is over the set.
        pull = start_pull(url, f"hf.co/user/split/{names[1]}")
        seen: list[dict[str, Any]] = []
        on_disk: set[tuple[bool, ...]] = set()
        deadline = time.monotonic() + 30
        while pull.poll() is None and time.monotonic() < deadline:
            r = httpx.get(f"{url}/model/{MODEL}/download/progress")
            if r.status_code == 200:
                seen.append(r.json())
            on_disk.add(tuple(p.exists() for p in paths))  # the first part looked at first
            time.sleep(0.05)
        _, err = pull.communicate(timeout=30)
        assert 0 == pull.returncode, err
        running = [s for s in seen if s["status"] == "IN-PROGRESS"]
        assert running, seen
        assert {total} == {s["total"] for s in running}
        assert any(len(parts[1]) < s["bytes"] < total for s in running), running
        assert any(s.get("etaSeconds") is not None for s in running), running
        assert [s["bytes"] for s in running] == sorted(s["bytes"] for s in running)
        # Parts 2 and 3 are published first; the first part, which makes the set look
        # downloaded, only after them.
        assert (False, True, False) in on_disk or (False, True, True) in on_disk, on_disk
        assert all(all(s) for s in on_disk if s[0]), on_disk
        assert parts == [p.read_bytes() for p in paths]
        assert not (models / f"{MODEL}.gguf").exists()
        cdn = [r.path for r in hub.cdn.requests if r.path.startswith("/repos/")]
        assert {f"/repos/user/split/{commit}/{n}" for n in names} == set(cdn)

        model = httpx.get(f"{url}/model/{MODEL}").json()
        assert (True, names[0], names, hashlib.sha256(parts[0]).hexdigest(), "llama.cpp") == (
            model["downloaded"], model["file"], model["parts"], model["sha256"],
            model["runtime"])
        assert 200 == httpx.post(f"{url}/model/update", json=model).status_code  # as it came
        completed = daemon.wait_for("download_completed", model=MODEL)
        assert total == completed["bytes"]

        # ctransformers reads one file: refused with a clear 400, before any worker starts.
        assert 200 == httpx.post(f"{url}/model/update",
                                 json={"id": MODEL, "runtime": "ctransformers"}).status_code
        refused = httpx.post(f"{url}/model/{MODEL}/load", timeout=60)
        assert (400, "runtime_unsupported") == (refused.status_code, refused.json()["error"])
        assert "split" in refused.json()["message"]

        # llama.cpp loads the set from its first part, and generates.
        assert 200 == httpx.post(f"{url}/model/update",
                                 json={"id": MODEL, "runtime": "auto"}).status_code
        loaded = httpx.post(f"{url}/model/{MODEL}/load", timeout=60)
        assert 200 == loaded.status_code, loaded.text
        assert "llama.cpp" == loaded.json()["runtime"]
        done = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "Hello", "max_tokens": 4, "seed": 1})
        assert 200 == done.status_code, done.text
        assert 0 < done.json()["usage"]["completion_tokens"] <= 4

        # Started again, the set is found whole: downloaded, nothing fetched again.
        assert 0 == daemon.stop()
        daemon.start()
        fetched = len(hub.cdn.requests)
        url = daemon.url
        again = httpx.get(f"{url}/model/{MODEL}").json()
        assert (True, names[0]) == (again["downloaded"], again["file"])
        assert fetched == len(hub.cdn.requests)

        # A newer set at the reference: downloaded beside the old set (in updates/, one progress
        # over the new set), the old set loadable meanwhile, then published over it (the same
        # final names) with the new revision, in one step.
        updates = daemon.storage / "updates"
        newer = publish_set(hub, tmp_path, 6, parts[0])
        update = httpx.post(f"{url}/model/{MODEL}/download", json={"update": True}, timeout=60)
        assert (200, "updating") == (update.status_code, update.json()["update"]), update.text
        loaded = httpx.post(f"{url}/model/{MODEL}/load", timeout=60)
        assert 200 == loaded.status_code, loaded.text
        staged = sorted(p.name for p in updates.iterdir())
        progress = httpx.get(f"{url}/model/{MODEL}/download/progress").json()
        assert ("IN-PROGRESS", sum(map(len, newer.parts))) == (
            progress["status"], progress["total"]), progress
        assert parts == [p.read_bytes() for p in paths]  # still the old set
        assert commit == httpx.get(f"{url}/model/{MODEL}").json()["revision"]
        started = daemon.wait_for("hub_update_started", model=MODEL)
        assert (sum(map(len, newer.parts)), 3) == (started["bytes"], started["parts"])
        daemon.wait_for("hub_updated", model=MODEL)
        assert staged and all(n.startswith(f"{MODEL}-0000") for n in staged), staged
        order = [line["event"] for line in daemon.lines if line.get("model") == MODEL]
        assert order.index("model_loaded") < order.index("model_imported"), order
        assert newer.parts == [p.read_bytes() for p in paths]
        model = httpx.get(f"{url}/model/{MODEL}").json()
        assert (newer.commit, hashlib.sha256(newer.parts[0]).hexdigest(), "loaded") == (
            model["revision"], model["sha256"], model["state"])
        assert [] == list(updates.iterdir())
        # The loaded model goes on with the old set, which it holds open.
        done = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "Hello", "max_tokens": 2, "seed": 1})
        assert 200 == done.status_code, done.text

        # Deleted while an update downloads: the update is cancelled, nothing is published,
        # and every part goes, nothing of the model is left, in updates/ either.
        publish_set(hub, tmp_path, 7, parts[0])
        update = httpx.post(f"{url}/model/{MODEL}/download", json={"update": True}, timeout=60)
        assert "updating" == update.json()["update"], update.text
        assert 204 == httpx.post(f"{url}/models/{MODEL}/delete", timeout=60).status_code
        daemon.wait_for("hub_update_cancelled", model=MODEL)
        assert [] == [p.name for p in models.iterdir() if p.name.startswith(MODEL)]
        deadline = time.monotonic() + 5
        while list(updates.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [] == list(updates.iterdir())
        assert 1 == len(daemon.events("hub_updated"))
        assert 0 == daemon.stop()


@attrs.frozen
class Published:
    commit: str
    parts: list[bytes]


def publish_set(hub: FakeHub, tmp_path: Path, seed: int, other: bytes) -> Published:
    """A new commit of user/split with another set of 3 parts (throttled on the CDN)."""
    parts = split_gguf(write_tiny_llama(tmp_path / f"set-{seed}.gguf", seed=seed), 3)
    files = split_files("tiny-Q8_0", parts)
    commit = hub.publish("user/split", {**files, "tiny.Q4_0.gguf": other})
    for name in files:
        hub.cdn.resources[f"/repos/user/split/{commit}/{name}"].faults = Faults(
            throttle=THROTTLE)
    return Published(commit, parts)
