"""Downloads through a real daemon: a real origin, the official SDK and trio-websocket."""

from __future__ import annotations

import hashlib
import json
import shutil
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio
from pieces_os_client.exceptions import ApiException
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.daemon import Daemon
from tests.e2e.conftest import DaemonFactory, Sdk
from tests.gguf_factory import gguf_of_size
from tests.origin import Origin, make_certificate, open_origin

MiB = 1024 * 1024


def payload(size: int, seed: int = 0) -> bytes:
    """A model file's bytes (downloads of anything else fail)."""
    return gguf_of_size(size, seed)


def entry(origin: Origin, path: str, data: bytes, *, checked: bool = True,
          **extra: Any) -> dict[str, Any]:
    model: dict[str, Any] = {"id": path.strip("/").replace(".gguf", ""), "name": path,
                             "url": origin.url(path)}
    if checked:
        model["sha256"] = hashlib.sha256(data).hexdigest()
        model["size"] = len(data)
    model.update(extra)
    return model


async def started(daemon: Daemon) -> Daemon:
    return await trio.to_thread.run_sync(daemon.start)


async def sdk_call(daemon: Daemon, method: str, *args: Any) -> Any:
    sdk = Sdk(daemon.url)
    api = sdk.models if method in ("models_snapshot", "unload_models",
                                   "models_delete_specific_model") else sdk.model
    return await trio.to_thread.run_sync(lambda: getattr(api, method)(*args))


async def get_json(daemon: Daemon, path: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"{daemon.url}{path}")
    assert 200 == r.status_code, r.text
    result: dict[str, Any] = r.json()
    return result


async def snapshot(daemon: Daemon, model_id: str) -> dict[str, Any]:
    return await get_json(daemon, f"/model/{model_id}")


async def watch(daemon: Daemon, model_id: str) -> tuple[list[dict[str, Any]], int | None]:
    """Every progress message until the server closes; and the close code."""
    url = daemon.url.replace("http://", "ws://") + f"/model/{model_id}/download/progress"
    messages: list[dict[str, Any]] = []
    async with open_websocket_url(url) as ws:
        try:
            while True:
                messages.append(json.loads(await ws.get_message()))
        except ConnectionClosed as closed:
            return messages, closed.reason.code if closed.reason else None
    raise AssertionError("unreachable")


async def wait_for_partial(daemon: Daemon, model_id: str, at_least: int) -> None:
    async with httpx.AsyncClient() as client:
        while True:
            r = await client.get(f"{daemon.url}/model/{model_id}/download/progress")
            if r.json()["bytes"] >= at_least:
                return
            await trio.sleep(0.02)


async def test_download_with_live_progress_is_verified_and_segmented(
    make_daemon: DaemonFactory,
) -> None:
    data = payload(24 * MiB)
    with trio.fail_after(60):
        async with open_origin() as origin:
            origin.add("/big.gguf", data)
            origin.faults("/big.gguf").throttle = 4 * MiB
            daemon = await started(make_daemon([entry(origin, "/big.gguf", data)],
                                               download={"connections": 8}))
            model = await sdk_call(daemon, "model_specific_model_download", "big")
            assert (True, False, False) == (model.downloading, model.downloaded, model.loaded)
            t0 = trio.current_time()
            messages, code = await watch(daemon, "big")
            elapsed = trio.current_time() - t0
            assert 1000 == code
            statuses = [m["status"] for m in messages]
            assert "COMPLETED" == statuses[-1]
            assert {"INITIALIZED", "IN-PROGRESS"} & set(statuses[:1])
            assert "IN-PROGRESS" in statuses
            assert 100 == messages[-1]["percentage"]
            percentages = [m["percentage"] for m in messages]
            assert sorted(percentages) == percentages
            assert all(m["model"] == "big" for m in messages)
            assert any(m.get("bytesPerSecond") and m.get("etaSeconds") is not None
                       for m in messages if m["status"] == "IN-PROGRESS")
            # at most ~10 messages a second per subscriber
            assert len(messages) <= 10 * elapsed + 3
            # one transfer over several ranged connections
            assert origin.max_active_connections >= 4
            assert origin.bytes_sent < len(data) * 1.1
            final = daemon.storage / "models" / "big.gguf"
            assert data == final.read_bytes()
            snap = await snapshot(daemon, "big")
            assert (True, False, "downloaded") == (snap["downloaded"], snap["downloading"],
                                                   snap["state"])
            progress = await sdk_call(daemon, "model_specific_model_download_progress", "big")
            assert ("COMPLETED", 100) == (progress.status.value, progress.percentage)
            # A second POST on a downloaded model returns it unchanged, no transfer.
            sent = origin.bytes_sent
            again = await sdk_call(daemon, "model_specific_model_download", "big")
            assert (True, False) == (again.downloaded, again.downloading)
            assert sent == origin.bytes_sent
            # A late subscriber gets COMPLETED and a close.
            late, code = await watch(daemon, "big")
            assert (["COMPLETED"], 1000) == ([m["status"] for m in late], code)
            assert daemon.events("state_changed")
            assert 0 == await trio.to_thread.run_sync(daemon.stop)


async def test_cancel_is_fast_keeps_the_partial_and_resumes(make_daemon: DaemonFactory) -> None:
    data = payload(16 * MiB, seed=1)
    with trio.fail_after(60):
        async with open_origin() as origin:
            origin.add("/m.gguf", data)
            origin.faults("/m.gguf").throttle = 256 * 1024  # per connection
            daemon = await started(make_daemon([entry(origin, "/m.gguf", data)]))
            await sdk_call(daemon, "model_specific_model_download", "m")
            await wait_for_partial(daemon, "m", 2 * MiB)
            before = time.monotonic()
            cancelled = await sdk_call(daemon, "model_specific_model_download_cancel", "m")
            after = time.monotonic()
            assert (False, False) == (cancelled.downloading, cancelled.downloaded)
            await trio.sleep(0.3)
            assert origin.last_byte_at is not None
            # Bytes stop flowing within 100 ms of the cancel's reply.
            assert origin.last_byte_at - after < 0.1, (origin.last_byte_at - before)
            snap = await snapshot(daemon, "m")
            assert "absent" == snap["state"]
            partial = snap["partialBytes"]
            assert 0 < partial < len(data)
            models_dir = daemon.storage / "models"
            assert (models_dir / "m.gguf.partial").exists()
            assert not (models_dir / "m.gguf").exists()
            messages, code = await watch(daemon, "m")
            assert (["CANCELED"], 1000) == ([m["status"] for m in messages], code)
            # Cancel again: a no-op that returns the model.
            again = await sdk_call(daemon, "model_specific_model_download_cancel", "m")
            assert (False, False) == (again.downloading, again.downloaded)

            # Resume: continues from the partial with Range + If-Range.
            origin.faults("/m.gguf").throttle = None
            sent_before = origin.bytes_sent
            await sdk_call(daemon, "model_specific_model_download", "m")
            messages, code = await watch(daemon, "m")
            assert "COMPLETED" == messages[-1]["status"]
            assert data == (models_dir / "m.gguf").read_bytes()
            resumed = [s for s in origin.seen("/m.gguf")
                       if s.if_range and s.range and not s.range.startswith("bytes=0-")]
            assert resumed
            assert origin.bytes_sent - sent_before <= len(data) - partial + 2 * MiB
            assert not (models_dir / "m.gguf.partial").exists()
            assert 0 == await trio.to_thread.run_sync(daemon.stop)


async def test_a_killed_pump_process_fails_the_download_not_the_daemon(
        make_daemon: DaemonFactory) -> None:
    """The bytes move in a child process of the daemon; when it dies (OOM killer, a signal),
    the download fails with a clear error, the daemon and its other models go on, and the
    next POST resumes from the partial."""
    data = payload(16 * MiB, seed=3)
    with trio.fail_after(60):
        async with open_origin() as origin:
            origin.add("/m.gguf", data)
            origin.faults("/m.gguf").throttle = 512 * 1024  # per connection
            daemon = await started(make_daemon([entry(origin, "/m.gguf", data)]))
            await sdk_call(daemon, "model_specific_model_download", "m")
            await wait_for_partial(daemon, "m", 2 * MiB)
            assert daemon.proc is not None
            (pump,) = [p for p in psutil.Process(daemon.proc.pid).children()
                       if "actors.pump_main" in " ".join(p.cmdline())]
            async with trio.open_nursery() as nursery:
                result: list[tuple[list[dict[str, Any]], int | None]] = []

                async def follow() -> None:
                    result.append(await watch(daemon, "m"))

                nursery.start_soon(follow)
                await trio.sleep(0.2)
                pump.kill()
            (messages, code) = result[0]
            assert ("FAILED", 1000) == (messages[-1]["status"], code)
            assert "pump process exited unexpectedly" in messages[-1]["error"]
            snap = await snapshot(daemon, "m")
            assert ("absent", True) == (snap["state"], snap["partialBytes"] >= 2 * MiB)
            assert "pump process exited unexpectedly" in snap["error"]
            # The daemon is fine; the next POST resumes from the partial.
            origin.faults("/m.gguf").throttle = None
            await sdk_call(daemon, "model_specific_model_download", "m")
            messages, code = await watch(daemon, "m")
            assert ("COMPLETED", 1000) == (messages[-1]["status"], code)
            assert data == (daemon.storage / "models" / "m.gguf").read_bytes()
            assert [s for s in origin.seen("/m.gguf")
                    if s.if_range and s.range and not s.range.startswith("bytes=0-")]
    assert [] == daemon.events("actor_crashed")
    assert 0 == daemon.stop()


async def test_sigkill_then_restart_resumes_by_itself(make_daemon: DaemonFactory) -> None:
    data = payload(12 * MiB, seed=2)
    with trio.fail_after(60):
        async with open_origin() as origin:
            origin.add("/k.gguf", data)
            origin.faults("/k.gguf").throttle = 256 * 1024
            daemon = await started(make_daemon([entry(origin, "/k.gguf", data)]))
            await sdk_call(daemon, "model_specific_model_download", "k")
            await wait_for_partial(daemon, "k", 2 * MiB)
            await trio.sleep(1.2)  # at least one sidecar write
            await trio.to_thread.run_sync(daemon.kill)
            sidecar = daemon.storage / "models" / "k.gguf.partial.json"
            assert sidecar.exists()
            origin.faults("/k.gguf").throttle = None
            await started(daemon)
            assert daemon.events("download_resume")
            messages, _ = await watch(daemon, "k")
            assert "COMPLETED" == messages[-1]["status"]
            assert data == (daemon.storage / "models" / "k.gguf").read_bytes()
            assert origin.bytes_sent < len(data) * 1.5
            assert 0 == await trio.to_thread.run_sync(daemon.stop)


async def test_a_hundred_concurrent_posts_make_one_download(make_daemon: DaemonFactory) -> None:
    data = payload(4 * MiB, seed=3)
    with trio.fail_after(60):
        async with open_origin() as origin:
            origin.add("/d.gguf", data)
            origin.faults("/d.gguf").throttle = 4 * MiB
            daemon = await started(make_daemon([entry(origin, "/d.gguf", data)]))
            replies: list[dict[str, Any]] = []
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(limits=limits, timeout=30) as client:

                async def post() -> None:
                    r = await client.post(f"{daemon.url}/model/d/download")
                    assert 200 == r.status_code
                    replies.append(r.json())

                async with trio.open_nursery() as nursery:
                    for _ in range(100):
                        nursery.start_soon(post)
            assert 100 == len(replies)
            assert all(r["downloading"] or r["downloaded"] for r in replies)
            messages, _ = await watch(daemon, "d")
            assert "COMPLETED" == messages[-1]["status"]
            assert origin.bytes_sent < len(data) * 1.1
            assert 1 == len(daemon.events("download_completed"))
            assert 0 == await trio.to_thread.run_sync(daemon.stop)


async def test_checksum_mismatch_fails_and_publishes_nothing(make_daemon: DaemonFactory) -> None:
    data = payload(1 * MiB, seed=4)
    with trio.fail_after(60):
        async with open_origin() as origin:
            origin.add("/bad.gguf", data)
            model = entry(origin, "/bad.gguf", data)
            model["sha256"] = "0" * 64
            daemon = await started(make_daemon([model]))
            await sdk_call(daemon, "model_specific_model_download", "bad")
            messages, code = await watch(daemon, "bad")
            assert ("FAILED", 1000) == (messages[-1]["status"], code)
            assert "sha256" in messages[-1]["error"] or "checksum" in messages[-1]["error"]
            snap = await snapshot(daemon, "bad")
            assert ("absent", False) == (snap["state"], snap["downloaded"])
            assert snap["error"]
            assert [] == list((daemon.storage / "models").glob("bad.gguf*[!d]"))
            assert not (daemon.storage / "models" / "bad.gguf").exists()
            progress = await sdk_call(daemon, "model_specific_model_download_progress", "bad")
            assert "FAILED" == progress.status.value
            # Load on an absent model is a conflict.
            try:
                await sdk_call(daemon, "model_specific_model_load", "bad")
            except ApiException as exc:
                assert 409 == exc.status
            else:
                raise AssertionError("load of an absent model succeeded")
            assert 0 == await trio.to_thread.run_sync(daemon.stop)


async def test_content_change_sends_reset_and_starts_over(make_daemon: DaemonFactory) -> None:
    old, new = payload(8 * MiB, seed=5), payload(8 * MiB, seed=6)
    with trio.fail_after(60):
        async with open_origin() as origin:
            origin.add("/c.gguf", old)
            origin.faults("/c.gguf").throttle = 256 * 1024
            daemon = await started(make_daemon([entry(origin, "/c.gguf", old, checked=False)]))
            await sdk_call(daemon, "model_specific_model_download", "c")
            await wait_for_partial(daemon, "c", 1 * MiB)
            await sdk_call(daemon, "model_specific_model_download_cancel", "c")
            origin.replace("/c.gguf", new)
            origin.faults("/c.gguf").throttle = None
            await sdk_call(daemon, "model_specific_model_download", "c")
            messages, _ = await watch(daemon, "c")
            statuses = [m["status"] for m in messages]
            assert "COMPLETED" == statuses[-1]
            assert new == (daemon.storage / "models" / "c.gguf").read_bytes()
            assert daemon.events("download_reset")
            assert 0 == await trio.to_thread.run_sync(daemon.stop)


async def test_faults_are_retried_and_4xx_fails_at_once(make_daemon: DaemonFactory) -> None:
    data = payload(2 * MiB, seed=7)
    with trio.fail_after(60):
        async with open_origin() as origin:
            origin.add("/r.gguf", data)
            origin.faults("/r.gguf").reset_after = 256 * 1024
            origin.faults("/r.gguf").reset_requests = 2
            origin.add("/gone.gguf", data)
            origin.faults("/gone.gguf").status = 404
            # A redirect to a link-local address (cloud metadata's): refused, never connected.
            origin.redirect("/meta.gguf", "http://169.254.0.1:9/latest/meta-data/")
            daemon = await started(make_daemon([entry(origin, "/r.gguf", data),
                                                entry(origin, "/gone.gguf", data),
                                                entry(origin, "/meta.gguf", data)]))
            await sdk_call(daemon, "model_specific_model_download", "meta")
            await sdk_call(daemon, "model_specific_model_download", "r")
            await sdk_call(daemon, "model_specific_model_download", "gone")
            messages, _ = await watch(daemon, "meta")
            assert "FAILED" == messages[-1]["status"]
            assert "link-local" in messages[-1]["error"], messages[-1]
            assert "url_refused" == daemon.wait_for("download_failed", model="meta")["code"]
            messages, _ = await watch(daemon, "r")
            assert "COMPLETED" == messages[-1]["status"]
            assert data == (daemon.storage / "models" / "r.gguf").read_bytes()
            assert daemon.events("download_retry")
            messages, _ = await watch(daemon, "gone")
            assert "FAILED" == messages[-1]["status"]
            assert "404" in messages[-1]["error"]
            assert 1 == len(origin.seen("/gone.gguf"))
            assert 0 == await trio.to_thread.run_sync(daemon.stop)


async def test_progress_of_an_idle_model_and_unknown_ids(make_daemon: DaemonFactory,
                                                        tmp_path: Path) -> None:
    with trio.fail_after(30):
        daemon = await started(make_daemon([{"id": "idle", "name": "Idle",
                                             "url": "https://models.invalid/idle.gguf"}]))
        messages, code = await watch(daemon, "idle")
        assert (["UNKNOWN"], 1000) == ([m["status"] for m in messages], code)
        progress = await sdk_call(daemon, "model_specific_model_download_progress", "idle")
        assert ("UNKNOWN", 0) == (progress.status.value, progress.percentage)
        async with httpx.AsyncClient() as client:
            r = await client.get(f"{daemon.url}/model/nope/download/progress")
            assert (410, "model_not_found") == (r.status_code, r.json()["error"])
            r = await client.post(f"{daemon.url}/model/nope/download/cancel")
            assert 410 == r.status_code
        assert 0 == await trio.to_thread.run_sync(daemon.stop)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_https_download_checks_the_certificate(make_daemon: DaemonFactory,
                                                     tmp_path: Path) -> None:
    data = payload(12 * MiB, seed=9)
    cert, key = make_certificate(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    with trio.fail_after(60):
        async with open_origin(tls=server) as origin:
            origin.add("/s.gguf", data)
            origin.faults("/s.gguf").throttle = 2 * MiB  # slow enough for several connections
            model = entry(origin, "/s.gguf", data)
            assert model["url"].startswith("https://")
            # Trusted through SSL_CERT_FILE: a verified download over several TLS connections.
            daemon = make_daemon([model], download={"allow_http": False})
            await trio.to_thread.run_sync(
                lambda: daemon.start(env={"SSL_CERT_FILE": str(cert)}))
            await sdk_call(daemon, "model_specific_model_download", "s")
            messages, _ = await watch(daemon, "s")
            assert "COMPLETED" == messages[-1]["status"]
            assert data == (daemon.storage / "models" / "s.gguf").read_bytes()
            assert origin.max_active_connections >= 2
            assert 0 == await trio.to_thread.run_sync(daemon.stop)

            # Not trusted: the download fails, nothing is published.
            untrusted = make_daemon([model], download={"allow_http": False, "retries": 0})
            await started(untrusted)
            await sdk_call(untrusted, "model_specific_model_download", "s")
            messages, _ = await watch(untrusted, "s")
            assert "FAILED" == messages[-1]["status"]
            assert "CERTIFICATE" in messages[-1]["error"].upper()
            assert not (untrusted.storage / "models" / "s.gguf").exists()
            assert 0 == await trio.to_thread.run_sync(untrusted.stop)


async def test_an_unsized_body_stops_at_the_known_size(make_daemon: DaemonFactory) -> None:
    """An origin that tells no size and sends far more than the catalog's size: the download
    stops one byte past it (size_mismatch), not after the origin's whole body."""
    data = payload(1 * MiB, seed=8)
    with trio.fail_after(60):
        async with open_origin() as origin:
            origin.add("/big.gguf", data + b"\0" * (48 * MiB))
            origin.faults("/big.gguf").unsized = True
            daemon = await started(make_daemon([entry(origin, "/big.gguf", data)],
                                               download={"retries": 0}))
            await sdk_call(daemon, "model_specific_model_download", "big")
            messages, _code = await watch(daemon, "big")
            assert "FAILED" == messages[-1]["status"], messages[-1]
            line = daemon.wait_for("download_failed", model="big")
            assert "size_mismatch" == line["code"], line
            assert f"known size of {len(data)} bytes" in messages[-1]["error"]
            on_disk = [p.stat().st_size for p in (daemon.storage / "models").glob("big.gguf*")
                       if not p.name.endswith(".json")]
            assert max(on_disk, default=0) <= len(data) + 1, on_disk
            assert not (daemon.storage / "models" / "big.gguf").exists()


async def test_an_unsized_download_stops_at_min_free(make_daemon: DaemonFactory,
                                                     tmp_path: Path) -> None:
    """No size anywhere: the download stops while the disk keeps [storage] min_free, says so,
    and leaves nothing behind (it could not resume)."""
    data = payload(96 * MiB, seed=9)
    with trio.fail_after(60):
        async with open_origin() as origin:
            origin.add("/nosize.gguf", data)
            origin.faults("/nosize.gguf").unsized = True
            # About 16 MiB may be written before the free space falls to min_free.
            free = shutil.disk_usage(tmp_path).free
            daemon = await started(make_daemon(
                [entry(origin, "/nosize.gguf", data, checked=False)],
                download={"retries": 0}, storage={"min_free": free - 16 * MiB}))
            await sdk_call(daemon, "model_specific_model_download", "nosize")
            messages, _code = await watch(daemon, "nosize")
            assert "FAILED" == messages[-1]["status"], messages[-1]
            assert "[storage] min_free" in messages[-1]["error"]
            line = daemon.wait_for("download_failed", model="nosize")
            assert "disk_full" == line["code"], line
            # It cannot resume (no size, no ranges): its bytes are given back, and the view
            # says what is on disk.
            assert [] == list((daemon.storage / "models").glob("nosize.gguf.partial*"))
            assert 0 == (await snapshot(daemon, "nosize"))["partialBytes"]


async def progress_of(daemon: Daemon, model_id: str) -> dict[str, Any]:
    return await get_json(daemon, f"/model/{model_id}/download/progress")


async def test_downloads_beyond_max_active_wait_in_line(make_daemon: DaemonFactory) -> None:
    """[download] max_active = 1: the next downloads wait in the order asked for, INITIALIZED
    with their place; a cancel of a waiting one is at once and moves the line up; when the
    running one ends, the next starts."""
    slow, small = payload(8 * MiB, seed=11), payload(1 * MiB, seed=12)
    with trio.fail_after(60):
        async with open_origin() as origin:
            origin.add("/run.gguf", slow)
            origin.faults("/run.gguf").throttle = 512 * 1024
            origin.add("/q1.gguf", small)
            origin.add("/q2.gguf", small)
            daemon = await started(make_daemon(
                [entry(origin, "/run.gguf", slow), entry(origin, "/q1.gguf", small),
                 entry(origin, "/q2.gguf", small)], download={"max_active": 1}))
            for model_id in ("run", "q1", "q2"):
                await sdk_call(daemon, "model_specific_model_download", model_id)
            await wait_for_partial(daemon, "run", 256 * 1024)
            assert [("INITIALIZED", 1), ("INITIALIZED", 2)] == [
                (p["status"], p.get("queuePosition"))
                for p in [await progress_of(daemon, "q1"), await progress_of(daemon, "q2")]]
            assert (await snapshot(daemon, "q1"))["downloading"]
            before = time.monotonic()
            await sdk_call(daemon, "model_specific_model_download_cancel", "q1")
            assert time.monotonic() - before < 1
            assert "CANCELED" == (await progress_of(daemon, "q1"))["status"]
            assert 1 == (await progress_of(daemon, "q2"))["queuePosition"]
            assert [] == origin.seen("/q1.gguf") == origin.seen("/q2.gguf")
            await sdk_call(daemon, "model_specific_model_download_cancel", "run")
            messages, _code = await watch(daemon, "q2")
            assert "COMPLETED" == messages[-1]["status"]
            assert "queuePosition" not in messages[-1]
            assert small == (daemon.storage / "models" / "q2.gguf").read_bytes()
            assert [2, 1] == [line["place"] for line in daemon.events("download_queued")
                              if line["model"] == "q2"]
            assert 0 == await trio.to_thread.run_sync(daemon.stop)
