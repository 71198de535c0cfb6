"""An attempt's end (a cancel, a failure) writes and fsyncs in worker threads, never on the event
loop; a slow end is bounded for the caller, and the next attempt of the same file waits for it."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from actors import partial
from actors.download import DownloadRequest, download_file, fetch
from actors.partial import partial_bytes, partial_path
from tests.actors.test_download import Sink
from tests.origin import open_origin

MiB = 1024 * 1024


def on_threads(monkeypatch: pytest.MonkeyPatch, module: Any, name: str,
               seen: list[bool]) -> None:
    """Record, for each call of module.name, whether it ran on the main (event loop) thread."""
    real: Callable[..., Any] = getattr(module, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.current_thread() is threading.main_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


async def test_a_cancel_records_what_arrived_in_the_sidecar_in_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_loop: list[bool] = []
    for name in ("write_sidecar", "sync_sidecar", "close_partial"):
        on_threads(monkeypatch, partial, name, on_loop)
        if hasattr(fetch, name):
            on_threads(monkeypatch, fetch, name, on_loop)
    data = random.Random(5).randbytes(4 * MiB)
    dest = tmp_path / "m.gguf"
    with trio.fail_after(20):
        async with open_origin() as origin:
            origin.add("/m.gguf", data)
            origin.faults("/m.gguf").throttle = 2 * MiB
            req = DownloadRequest(origin.url("/m.gguf"), dest, allow_http=True, connections=1)
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(download_file, req, Sink())
                    await origin.wait_bytes_sent(MiB)
                    scope.cancel()
    kept = await trio.to_thread.run_sync(partial_bytes, dest)
    assert 0 < kept <= origin.bytes_sent
    assert data[:kept] == partial_path(dest).read_bytes()[:kept]
    assert on_loop and not any(on_loop)


async def test_a_slow_end_is_bounded_and_the_next_attempt_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "CLEANUP_BOUND", 0.05)
    release, order = threading.Event(), []
    slow_started = trio.Event()
    token = trio.lowlevel.current_trio_token()
    real_write, real_lock = partial.write_sidecar, partial.partial_lock

    cancelled = threading.Event()

    def slow_write(*args: Any) -> None:  # the sidecar of the cancelled attempt's end
        if not cancelled.is_set():
            real_write(*args)
            return
        trio.from_thread.run_sync(slow_started.set, trio_token=token)
        assert release.wait(10)
        real_write(*args)
        order.append("first attempt's end")

    next_waits = trio.Event()

    class Watched:
        def __init__(self, dest: Path) -> None:
            self.lock = real_lock(dest)

        def __enter__(self) -> None:
            order.append("second attempt waits")
            if not next_waits.is_set():
                trio.from_thread.run_sync(next_waits.set, trio_token=token)
            self.lock.acquire()
            order.append("second attempt opens")

        def __exit__(self, *exc: object) -> None:
            self.lock.release()

    monkeypatch.setattr(partial, "write_sidecar", slow_write)
    data = random.Random(6).randbytes(2 * MiB)
    dest = tmp_path / "m.gguf"
    with trio.fail_after(10):
        async with open_origin() as origin, httpx.AsyncClient() as client:
            origin.add("/m.gguf", data)
            origin.faults("/m.gguf").throttle = 4 * MiB
            req = DownloadRequest(origin.url("/m.gguf"), dest, allow_http=True, connections=1,
                                  sha256=hashlib.sha256(data).hexdigest())
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: download_file(req, Sink(), client=client))
                    await origin.wait_bytes_sent(256 * 1024)
                    scope.cancel()
                    cancelled.set()
            # The cancelled attempt returned although its end still runs (blocked above).
            await slow_started.wait()
            assert [] == order
            monkeypatch.setattr(partial, "partial_lock", Watched)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: download_file(req, Sink(), client=client))
                await next_waits.wait()
                release.set()
    assert ["second attempt waits", "first attempt's end", "second attempt opens"] == order[:3]
    assert data == dest.read_bytes()
