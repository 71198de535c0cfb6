"""Load and unload through a real daemon: real origin, real downloads, real worker processes,
the official SDK. Workers are found as the daemon's child processes (psutil).

Generation has no HTTP route yet; the last tests drive it through the registry and the model's
actor, as the daemon runs them, with real workers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio
import trio.testing

from actors import messages as m
from actors.errors import Conflict, InvalidInput, OperationFailed, Unavailable
from actors.generation import GenerationStream
from actors.state import State
from actors.worker import GenerateParams
from supervisor.config import CatalogEntry, Config, RuntimeConfig, StorageConfig
from supervisor.registry import Registry, serve_registry
from tests.daemon import Daemon
from tests.e2e.conftest import DaemonFactory, Sdk
from tests.gguf_factory import corrupt_header, truncate, write_tiny_llama
from tests.origin import Origin, open_origin

MB = 1_000_000


# -- helpers ---------------------------------------------------------------------------------


def entry(origin: Origin, model_id: str, data: bytes | Path, *, checked: bool = True,
          **extra: Any) -> dict[str, Any]:
    """A catalog entry served by origin (sha256 and size given unless checked=False)."""
    path = f"/{model_id}.gguf"
    origin.add(path, data)
    model: dict[str, Any] = {"id": model_id, "name": model_id, "url": origin.url(path)}
    if checked:
        raw = data if isinstance(data, bytes) else data.read_bytes()
        model["sha256"] = hashlib.sha256(raw).hexdigest()
        model["size"] = len(raw)
    model.update(extra)
    return model


async def started(daemon: Daemon) -> Daemon:
    return await trio.to_thread.run_sync(daemon.start)


async def stopped(daemon: Daemon) -> int:
    """SIGTERM; the exit code, once every log line up to "stopped" has been read."""
    code = await trio.to_thread.run_sync(daemon.stop)
    if code == 0:
        await logged(daemon, "stopped")
    return code


async def sdk_model(daemon: Daemon, method: str, model_id: str) -> Any:
    api = Sdk(daemon.url).model
    return await trio.to_thread.run_sync(lambda: getattr(api, method)(model_id))


async def http(daemon: Daemon, method: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.request(method, daemon.url + path)


async def snapshot(daemon: Daemon, model_id: str) -> dict[str, Any]:
    r = await http(daemon, "GET", f"/model/{model_id}")
    assert 200 == r.status_code, r.text
    body: dict[str, Any] = r.json()
    return body


async def download(daemon: Daemon, model_id: str) -> dict[str, Any]:
    """Download through the daemon (the SDK's POST, then its log line) and return the model."""
    model = await sdk_model(daemon, "model_specific_model_download", model_id)
    assert model.downloading or model.downloaded
    await logged(daemon, "download_completed", model=model_id)
    body = await snapshot(daemon, model_id)
    assert (True, False, False) == (body["downloaded"], body["downloading"], body["loaded"])
    return body


async def load(daemon: Daemon, model_id: str) -> dict[str, Any]:
    model = await sdk_model(daemon, "model_specific_model_load", model_id)
    assert (model.id, model.downloaded, model.loaded) == (model_id, True, True)
    return await snapshot(daemon, model_id)


def workers(daemon: Daemon) -> list[psutil.Process]:
    assert daemon.proc is not None
    return [p for p in psutil.Process(daemon.proc.pid).children()
            if "actors.worker_main" in p.cmdline()]


def worker_of(daemon: Daemon, model_id: str) -> psutil.Process:
    [found] = [p for p in workers(daemon) if f"{model_id}.gguf" in " ".join(p.cmdline())]
    return found


async def wait_gone(pid: int) -> None:
    """Until pid has exited (a zombie counts: an orphan's reaper may be slow or absent)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


def exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def logged(daemon: Daemon, event: str, **match: Any) -> dict[str, Any]:
    """The daemon's log line (already written before its HTTP reply; maybe not yet read)."""
    return await trio.to_thread.run_sync(
        lambda: daemon.wait_for(event, timeout=25, **match))


async def refused(daemon: Daemon, model_id: str) -> tuple[int, str, str]:
    r = await http(daemon, "POST", f"/model/{model_id}/load")
    body = r.json()
    assert "Traceback" not in r.text
    return r.status_code, body["error"], body["message"]


@pytest.fixture
def tiny(tmp_path: Path) -> bytes:
    return write_tiny_llama(tmp_path / "tiny.gguf", seed=1).read_bytes()


# -- tests -----------------------------------------------------------------------------------


async def test_load_and_unload_through_the_sdk(make_daemon: DaemonFactory, tiny: bytes) -> None:
    with trio.fail_after(30):
        async with open_origin() as origin:
            slow = entry(origin, "slow", tiny)
            origin.faults("/slow.gguf").throttle = 20_000
            daemon = await started(make_daemon([entry(origin, "tiny", tiny), slow]))

            body = await download(daemon, "tiny")
            # The GGUF header fills in what the catalog does not say.
            assert 128 == body["maxTokens"]["total"]
            assert "F32" == body["quantization"]
            assert body["parameters"] > 0

            # Not loadable unless downloaded: 409.
            assert (409, "not_loadable") == (await refused(daemon, "slow"))[:2]
            await sdk_model(daemon, "model_specific_model_download", "slow")
            status, code, message = await refused(daemon, "slow")
            assert (409, "not_loadable") == (status, code)
            assert "downloading" in message
            await sdk_model(daemon, "model_specific_model_download_cancel", "slow")
            assert [] == workers(daemon)

            started_at = trio.current_time()
            body = await load(daemon, "tiny")
            round_trip = trio.current_time() - started_at
            assert (True, True, "loaded") == (body["downloaded"], body["loaded"], body["state"])
            worker = worker_of(daemon, "tiny")
            loaded = await logged(daemon, "model_loaded", model="tiny")
            assert worker.pid == loaded["pid"]
            assert body["loadSeconds"] == loaded["load_seconds"]
            assert 0 < loaded["runtime_load_seconds"] <= body["loadSeconds"] <= round_trip
            print(f"\ntiny load: {round_trip * 1e3:.0f} ms through the SDK, "
                  f"{body['loadSeconds'] * 1e3:.0f} ms spawn to ready, "
                  f"{loaded['runtime_load_seconds'] * 1e3:.1f} ms in ctransformers")

            # Loading a loaded model returns it; same worker.
            assert (await load(daemon, "tiny"))["loaded"]
            assert [worker.pid] == [p.pid for p in workers(daemon)]

            model = await sdk_model(daemon, "model_specific_model_unload", "tiny")
            assert (True, False) == (model.downloaded, model.loaded)
            assert not psutil.pid_exists(worker.pid)  # reaped, not only exited
            assert [] == workers(daemon)
            model = await sdk_model(daemon, "model_specific_model_unload", "tiny")
            assert (True, False) == (model.downloaded, model.loaded)
            assert 0 == await stopped(daemon)
            assert [worker.pid] == [line["pid"] for line in daemon.events("model_unloaded")]


async def test_big_model_memory_lives_in_the_worker(make_daemon: DaemonFactory,
                                                   tmp_path: Path) -> None:
    big = write_tiny_llama(tmp_path / "big.gguf", seed=2, extra_bytes=100 * MB)
    with trio.fail_after(30):
        async with open_origin() as origin:
            daemon = await started(make_daemon([entry(origin, "big", big, checked=False)]))
            await download(daemon, "big")
            assert daemon.proc is not None
            daemon_rss = psutil.Process(daemon.proc.pid).memory_info().rss
            body = await load(daemon, "big")
            worker = worker_of(daemon, "big")
            worker_rss = worker.memory_info().rss
            daemon_rss_loaded = psutil.Process(daemon.proc.pid).memory_info().rss
            loaded = await logged(daemon, "model_loaded", model="big")
            print(f"\nbig ({big.stat().st_size / MB:.0f} MB) worker RSS {worker_rss / MB:.0f} MB; "
                  f"daemon RSS {daemon_rss / MB:.0f} -> {daemon_rss_loaded / MB:.0f} MB; "
                  f"load {body['loadSeconds'] * 1e3:.0f} ms spawn to ready, "
                  f"{loaded['runtime_load_seconds'] * 1e3:.0f} ms in ctransformers")
            assert worker_rss > 100 * MB
            assert daemon_rss_loaded - daemon_rss < 20 * MB  # the weights are not in the daemon

            await sdk_model(daemon, "model_specific_model_unload", "big")
            assert not psutil.pid_exists(worker.pid)
            assert 0 == await stopped(daemon)


async def test_damaged_files_are_refused_and_the_daemon_keeps_serving(
    make_daemon: DaemonFactory, tmp_path: Path
) -> None:
    source = write_tiny_llama(tmp_path / "source.gguf", seed=3)
    bad_header = corrupt_header(source, dest=tmp_path / "bad-header.gguf")
    with trio.fail_after(30):
        async with open_origin() as origin:
            daemon = make_daemon([
                # Refused by the download (no sha256 needed): the rule of `import`.
                entry(origin, "bad-header", bad_header, checked=False),
                # Already in storage when the daemon starts: refused at load.
                {"id": "cut", "name": "cut", "url": origin.url("/missing.gguf")},
            ])
            (daemon.storage / "models").mkdir(parents=True)
            truncate(source, 0.5, dest=daemon.storage / "models" / "cut.gguf")
            await started(daemon)
            await sdk_model(daemon, "model_specific_model_download", "bad-header")
            failed = await logged(daemon, "download_failed", model="bad-header")
            assert "model_file_invalid" == failed["code"]
            body = await snapshot(daemon, "bad-header")
            assert (False, "absent") == (body["downloaded"], body["state"])
            assert "impossible" in body["error"]
            assert not list((daemon.storage / "models").glob("bad-header.gguf*[!d]"))

            status, code, message = await refused(daemon, "cut")
            assert (500, "model_file_invalid") == (status, code)
            assert "truncated" in message
            body = await snapshot(daemon, "cut")
            assert (True, False, "downloaded") == (
                body["downloaded"], body["loaded"], body["state"])
            assert "truncated" in body["error"]
            assert [] == workers(daemon)
            assert 200 == (await http(daemon, "GET", "/models")).status_code
            assert 0 == await stopped(daemon)
            assert [] == daemon.events("actor_crashed")
            assert ["cut"] == [line["model"] for line in daemon.events("model_file_invalid")
                               if "truncated" in line["reason"]]


async def test_killed_worker_is_noticed(make_daemon: DaemonFactory, tiny: bytes) -> None:
    with trio.fail_after(30):
        async with open_origin() as origin:
            daemon = await started(make_daemon([entry(origin, "tiny", tiny)]))
            await download(daemon, "tiny")
            await load(daemon, "tiny")
            pid = worker_of(daemon, "tiny").pid
            os.kill(pid, signal.SIGKILL)
            line = await logged(daemon, "worker_exited", model="tiny")
            assert (pid, -signal.SIGKILL) == (line["pid"], line["returncode"])
            body = await snapshot(daemon, "tiny")
            assert (True, False, "downloaded") == (body["downloaded"], body["loaded"],
                                                   body["state"])
            assert "signal 9" in body["error"]
            assert [] == workers(daemon)  # reaped
            # Still serving, and the model loads again.
            body = await load(daemon, "tiny")
            assert "error" not in body
            assert pid != worker_of(daemon, "tiny").pid
            assert 0 == await stopped(daemon)


async def test_least_recently_used_is_evicted(make_daemon: DaemonFactory,
                                              tmp_path: Path) -> None:
    files = {name: write_tiny_llama(tmp_path / f"{name}.gguf", seed=i).read_bytes()
             for i, name in enumerate(("a", "b", "c"))}
    with trio.fail_after(30):
        async with open_origin() as origin:
            daemon = await started(make_daemon(
                [entry(origin, name, data) for name, data in files.items()],
                runtime={"max_loaded": 2}))
            for name in files:
                await download(daemon, name)
            await load(daemon, "a")
            await load(daemon, "b")
            a_pid = worker_of(daemon, "a").pid
            await load(daemon, "a")  # a is now the most recently used
            await load(daemon, "c")  # so b makes room
            evicted = await logged(daemon, "model_evicted")
            assert ("b", "c") == (evicted["model"], evicted["to_make_room_for"])
            loaded = {m["id"]: m["loaded"] for m in
                      (await http(daemon, "GET", "/models")).json()["iterable"]}
            assert {"a": True, "b": False, "c": True} == loaded
            assert {"a.gguf", "c.gguf"} == {
                Path(p.cmdline()[p.cmdline().index("--model") + 1]).name
                for p in workers(daemon)}
            assert a_pid == worker_of(daemon, "a").pid

            # POST /models/unload: every model, 204.
            await trio.to_thread.run_sync(Sdk(daemon.url).models.unload_models)
            assert [] == workers(daemon)
            assert not any(m["loaded"] for m in
                           (await http(daemon, "GET", "/models")).json()["iterable"])
            assert 0 == await stopped(daemon)


async def test_max_loaded_1_unloads_the_other(make_daemon: DaemonFactory,
                                              tmp_path: Path) -> None:
    files = {name: write_tiny_llama(tmp_path / f"{name}.gguf", seed=i).read_bytes()
             for i, name in enumerate(("a", "b"))}
    with trio.fail_after(30):
        async with open_origin() as origin:
            daemon = await started(make_daemon(
                [entry(origin, name, data) for name, data in files.items()],
                runtime={"max_loaded": 1}))
            for name in files:
                await download(daemon, name)
            await load(daemon, "a")
            a_pid = worker_of(daemon, "a").pid
            await load(daemon, "b")
            evicted = await logged(daemon, "model_evicted")
            assert ("a", "b") == (evicted["model"], evicted["to_make_room_for"])
            assert not psutil.pid_exists(a_pid)
            assert ["b.gguf"] == [Path(p.cmdline()[p.cmdline().index("--model") + 1]).name
                                  for p in workers(daemon)]
            body = await snapshot(daemon, "a")
            assert (True, False, None) == (body["downloaded"], body["loaded"], body.get("error"))
            assert 0 == await stopped(daemon)


async def test_no_memory_and_load_timeout_are_refused(make_daemon: DaemonFactory,
                                                      tmp_path: Path, tiny: bytes) -> None:
    with trio.fail_after(30):
        daemon = make_daemon([
            {"id": "huge", "name": "huge", "url": "https://models.invalid/huge.gguf",
             "ram": 1 << 50},
            {"id": "tiny", "name": "tiny", "url": "https://models.invalid/tiny.gguf"},
        ], runtime={"load_timeout": 0.01})
        (daemon.storage / "models").mkdir(parents=True)
        for name in ("huge", "tiny"):
            (daemon.storage / "models" / f"{name}.gguf").write_bytes(tiny)
        await started(daemon)
        status, code, message = await refused(daemon, "huge")
        assert (507, "insufficient_memory") == (status, code)
        assert "free memory" in message
        status, code, message = await refused(daemon, "tiny")
        assert (500, "load_failed") == (status, code)
        assert "did not load within" in message
        assert daemon.proc is not None
        assert [] == psutil.Process(daemon.proc.pid).children(recursive=True)  # killed, reaped
        for name in ("huge", "tiny"):
            body = await snapshot(daemon, name)
            assert (True, False) == (body["downloaded"], body["loaded"])
        assert 0 == await stopped(daemon)


async def test_sigterm_unloads_every_model_and_exits_0(make_daemon: DaemonFactory,
                                                       tmp_path: Path) -> None:
    files = {name: write_tiny_llama(tmp_path / f"{name}.gguf", seed=i).read_bytes()
             for i, name in enumerate(("a", "b"))}
    with trio.fail_after(30):
        async with open_origin() as origin:
            daemon = await started(make_daemon(
                [entry(origin, name, data) for name, data in files.items()]))
            for name in files:
                await download(daemon, name)
                await load(daemon, name)
            pids = sorted(p.pid for p in workers(daemon))
            assert 2 == len(pids)
            assert 0 == await stopped(daemon)
            # The daemon reaped them itself before it exited.
            assert not any(psutil.pid_exists(pid) for pid in pids)
            assert pids == sorted(line["pid"] for line in daemon.events("model_unloaded"))
            events = [line["event"] for line in daemon.lines]
            assert events.index("stopped") > max(
                i for i, e in enumerate(events) if e == "model_unloaded")


async def test_daemon_sigkill_leaves_no_worker(make_daemon: DaemonFactory,
                                               tiny: bytes) -> None:
    with trio.fail_after(30):
        async with open_origin() as origin:
            daemon = await started(make_daemon([entry(origin, "tiny", tiny)]))
            await download(daemon, "tiny")
            await load(daemon, "tiny")
            pid = worker_of(daemon, "tiny").pid
            await trio.to_thread.run_sync(daemon.kill)
            # The worker sees EOF on its stdin and exits by itself.
            with trio.fail_after(5):
                await wait_gone(pid)
            assert exited(pid)


# -- generation through the registry's actor, with a real worker -----------------------------


@contextlib.asynccontextmanager
async def open_registry(storage: Path, *models: str) -> AsyncIterator[Registry]:
    config = Config(
        storage=StorageConfig(dir=str(storage)),
        runtime=RuntimeConfig(threads=1, load_timeout=30.0),
        models=[CatalogEntry(id=m, name=m, url=f"https://models.invalid/{m}.gguf")
                for m in models],
    )
    async with trio.open_nursery() as nursery:
        registry: Registry = await nursery.start(serve_registry, config)
        yield registry
        nursery.cancel_scope.cancel()


async def complete(registry: Registry, model_id: str, prompt: str,
                   params: GenerateParams) -> tuple[str, GenerationStream]:
    stream = await registry.generate(model_id, prompt, params)
    async with stream:
        return "".join([piece async for piece in stream]), stream


async def test_generation_with_emoji_and_cjk_prompts(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    (storage / "models").mkdir(parents=True)
    write_tiny_llama(storage / "models" / "tiny.gguf", seed=1)
    with trio.fail_after(30):
        async with open_registry(storage, "tiny") as registry:
            with pytest.raises(Conflict):
                await registry.generate("tiny", "Hello", GenerateParams())
            view = await registry.call("tiny", lambda r: m.Load(reply=r))
            pid = view.worker_pid
            assert pid is not None

            params = GenerateParams(max_new_tokens=8, seed=7)
            for prompt in ("😀漢字🎉ひらがな" * 3, "👩‍👩‍👧‍👦 한국어 العربية", "Hello"):
                first, stream = await complete(registry, "tiny", prompt, params)
                again, _ = await complete(registry, "tiny", prompt, params)
                assert first == again  # same seed, same text: a real model answered
                assert stream.result is not None and stream.result.prompt_tokens > len(prompt)
            # Far more tokens than characters, beyond the context: refused, worker alive.
            with pytest.raises(InvalidInput, match="context"):
                await complete(registry, "tiny", "😀漢字🎉" * 100, params)
            # Not encodable as UTF-8 at all: refused before anything reaches the worker.
            with pytest.raises(InvalidInput, match="not valid Unicode"):
                await complete(registry, "tiny", "broken \ud83d surrogate", params)
            _, stream = await complete(registry, "tiny", "漢字", params)
            assert stream.result is not None
            assert psutil.pid_exists(pid) and not exited(pid)


async def test_stream_ends_with_an_error_when_its_worker_goes(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    (storage / "models").mkdir(parents=True)
    # Slow enough per token (a wide model) that the stream is still running when we act.
    write_tiny_llama(storage / "models" / "big.gguf", seed=2, context_length=2048,
                     extra_bytes=100 * MB)
    long_run = GenerateParams(max_new_tokens=2000, seed=3)
    with trio.fail_after(30):
        async with open_registry(storage, "big") as registry:
            view = await registry.call("big", lambda r: m.Load(reply=r))
            pid = view.worker_pid
            assert pid is not None
            stream = await registry.generate("big", "Once", long_run)
            pieces = 0
            with pytest.raises(OperationFailed) as died:
                async with stream:
                    async for _ in stream:
                        pieces += 1
                        if pieces == 1:
                            os.kill(pid, signal.SIGKILL)
            assert "worker_exited" == died.value.code
            assert pieces < 100
            await trio.testing.wait_all_tasks_blocked(0.05)  # the actor's watcher reports it
            view = await registry.call("big", lambda r: m.GetSnapshot(reply=r))
            assert (State.DOWNLOADED, None) == (view.state, view.worker_pid)
            assert view.error is not None and "signal 9" in view.error

            view = await registry.call("big", lambda r: m.Load(reply=r))
            pid = view.worker_pid
            assert pid is not None
            stream = await registry.generate("big", "Once", long_run)
            pieces = 0
            with pytest.raises(Unavailable) as unloaded:
                async with stream:
                    async for _ in stream:
                        pieces += 1
                        if pieces == 1:
                            view = await registry.call("big", lambda r: m.Unload(reply=r))
            assert "model_unloaded" == unloaded.value.code
            assert (State.DOWNLOADED, None) == (view.state, view.error)
            assert not psutil.pid_exists(pid)
