"""Crash consistency: SIGKILL a real daemon at random moments of a download and of custom
model updates, restart it, and check that nothing unverified is published, no record is
half-written, and the download resumes. MODELD_CRASH_POINTS sets the number of kills
(default 10), MODELD_CRASH_SEED the random seed."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.daemon import Daemon
from tests.e2e.conftest import DaemonFactory
from tests.e2e.test_download_e2e import MiB, entry, payload, started, watch
from tests.origin import open_origin

POINTS = int(os.environ.get("MODELD_CRASH_POINTS", "10"))
SEED = int(os.environ.get("MODELD_CRASH_SEED", "1234"))


def check_storage(storage: Path, data: bytes, descriptions: set[str]) -> None:
    """What a crash may leave: only verified files published, only whole records."""
    published = storage / "models" / "crash.gguf"
    if published.exists():
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(
            published.read_bytes()).hexdigest()
    for record in (storage / "custom").glob("*.json"):
        parsed = json.loads(record.read_text())  # never half-written
        assert parsed["description"] in descriptions
    sidecar = storage / "models" / "crash.gguf.partial.json"
    if sidecar.exists():
        side = json.loads(sidecar.read_text())
        partial = (storage / "models" / "crash.gguf.partial").read_bytes()
        for start, end in side["done"]:  # every range the sidecar claims is really there
            assert data[start:end] == partial[start:end]


async def update_forever(daemon: Daemon, model_id: str, sent: set[str]) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        for n in range(10_000):
            text = f"update {n} of {model_id}"
            sent.add(text)
            try:
                await client.post(f"{daemon.url}/model/update",
                                  json={"id": model_id, "description": text})
            except httpx.TransportError:
                return


@pytest.mark.slow
async def test_sigkill_at_random_moments_loses_nothing(make_daemon: DaemonFactory) -> None:
    rng = random.Random(SEED)
    data = payload(6 * MiB, seed=SEED)
    with trio.fail_after(60 + 4 * POINTS):
        async with open_origin() as origin:
            origin.add("/crash.gguf", data)
            origin.faults("/crash.gguf").throttle = 48 * 1024  # per connection: many kill points
            daemon = make_daemon([entry(origin, "/crash.gguf", data)])
            await started(daemon)
            async with httpx.AsyncClient() as client:
                r = await client.post(f"{daemon.url}/models/create",
                                      json={"name": "crash victim", "description": "start"})
                model_id: str = r.json()["id"]
            descriptions = {"start"}
            for _point in range(POINTS):
                async with trio.open_nursery() as nursery:
                    async with httpx.AsyncClient() as client:
                        await client.post(f"{daemon.url}/model/crash/download")
                    nursery.start_soon(update_forever, daemon, model_id, descriptions)
                    await trio.sleep(rng.uniform(0.05, 0.6))
                    await trio.to_thread.run_sync(daemon.kill)
                check_storage(daemon.storage, data, descriptions)
                await started(daemon)
                async with httpx.AsyncClient() as client:
                    snap: dict[str, Any] = (await client.get(
                        f"{daemon.url}/model/{model_id}")).json()
                assert snap["description"] in descriptions
            # Finally let it finish: the download resumes and verifies.
            origin.faults("/crash.gguf").throttle = None
            async with httpx.AsyncClient() as client:
                await client.post(f"{daemon.url}/model/crash/download")
            messages, _ = await watch(daemon, "crash")
            assert "COMPLETED" == messages[-1]["status"]
            assert data == (daemon.storage / "models" / "crash.gguf").read_bytes()
            # Resumed, not restarted from zero every time.
            assert origin.bytes_sent < 3 * len(data)
            assert 0 == await trio.to_thread.run_sync(daemon.stop)
