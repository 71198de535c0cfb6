"""An attempt's end (a cancel, a failure) writes and fsyncs in worker threads, never on the event
loop; a slow end is bounded for the caller, and the next attempt of the same file waits for it."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from actors import download as dl
from actors import partial
from actors.download import DownloadRequest, download_file
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


async def test_a_cancel_writes_what_arrived_and_the_sidecar_in_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing is written while bytes flow: everything received is left over at the cancel.
    monkeypatch.setattr(dl, "WRITE_BUFFER", 1 << 40)
    monkeypatch.setattr(dl, "WRITE_INTERVAL", 1e9)
    on_loop: list[bool] = []
    for module, name in ((partial, "pwrite_all"), (partial, "write_sidecar"),
                         (dl, "pwrite_all"), (dl, "write_sidecar")):
        on_threads(monkeypatch, module, name, on_loop)
    data = random.Random(5).randbytes(2 * MiB)
    arrived = trio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        start = int(request.headers["range"].removeprefix("bytes=").split("-")[0])
        head = {"etag": '"e"', "content-range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        if request.headers["range"] == "bytes=0-0":
            return httpx.Response(206, headers={**head, "content-range": f"bytes 0-0/{len(data)}"},
                                  content=data[:1])

        async def body() -> AsyncIterator[bytes]:
            yield data[start:start + 300_000]
            arrived.set()  # the downloader asked for more: it holds the chunk above
            await trio.sleep_forever()

        return httpx.Response(206, headers=head, content=body())

    dest = tmp_path / "m.gguf"
    with trio.fail_after(10):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            req = DownloadRequest("http://origin.test/m.gguf", dest, allow_http=True)
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def run() -> None:
                    with scope:
                        await download_file(req, Sink(), client=client)

                nursery.start_soon(run)
                await arrived.wait()
                scope.cancel()
    assert 300_000 == await trio.to_thread.run_sync(partial_bytes, dest)
    assert data[:300_000] == partial_path(dest).read_bytes()[:300_000]
    assert on_loop and not any(on_loop)


async def test_a_slow_end_is_bounded_and_the_next_attempt_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dl, "CLEANUP_BOUND", 0.05)
    release, order = threading.Event(), []
    slow_started = trio.Event()
    token = trio.lowlevel.current_trio_token()
    real_write, real_lock = partial.write_sidecar, dl.partial_lock

    def slow_write(*args: Any) -> None:  # the sidecar of the cancelled attempt's end
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
            # The cancelled attempt returned although its end still runs (blocked above).
            await slow_started.wait()
            assert [] == order
            monkeypatch.setattr(dl, "partial_lock", Watched)
            monkeypatch.setattr(partial, "partial_lock", Watched)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: download_file(req, Sink(), client=client))
                await next_waits.wait()
                release.set()
    assert ["second attempt waits", "first attempt's end", "second attempt opens"] == order[:3]
    assert data == dest.read_bytes()
