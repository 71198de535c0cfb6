"""actors/download/ against a real origin (tests/origin.py) and, for timing rules, fakes."""

from __future__ import annotations

import email.utils
import hashlib
import json
import random
import shutil
import signal
import time
from pathlib import Path

import attrs
import httpx
import psutil
import pytest
import trio
import trio.testing

from actors import download as dl
from actors.download import (
    ChecksumMismatch,
    DiskFull,
    DownloadError,
    DownloadRequest,
    OriginError,
    OriginUnreachable,
    SizeMismatch,
    TooManyRedirects,
    UrlRefused,
    download_file,
)
from actors.partial import partial_bytes, partial_path, remove_partial, sidecar_path
from tests.origin import Origin, open_origin

MiB = 1024 * 1024


@attrs.define
class Sink:
    updates: int = 0
    done: int = 0
    total: int | None = None
    reasons: list[str] = attrs.Factory(list)  # of the resets
    retries: list[tuple[int, float, str]] = attrs.Factory(list)

    @property
    def resets(self) -> int:
        return len(self.reasons)

    def update(self, done: int, total: int | None, *, connections: int | None = None) -> None:
        self.updates += 1
        self.done, self.total = done, total

    def reset(self, reason: str) -> None:
        self.reasons.append(reason)

    def retrying(self, attempt: int, delay: float, reason: str) -> None:
        self.retries.append((attempt, delay, reason))


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def request(origin: Origin, path: str, dest: Path, **kw: object) -> DownloadRequest:
    return DownloadRequest(origin.url(path), dest, allow_http=True, **kw)  # type: ignore[arg-type]


async def cancel_after(req: DownloadRequest, origin: Origin, nbytes: int) -> float:
    """Run a download and cancel it once the origin sent `nbytes`; returns the cancel time."""
    cancelled_at = 0.0
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                await download_file(req, Sink())

        nursery.start_soon(run)
        await origin.wait_bytes_sent(nbytes)
        cancelled_at = time.monotonic()
        scope.cancel()
    assert scope.cancelled_caught
    return cancelled_at


def listdir(path: Path) -> list[Path]:
    return list(path.iterdir())


def ranges_seen(origin: Origin, path: str) -> list[int]:
    """Start offsets of the ranged GETs (the probe's bytes=0-0 left out)."""
    starts = []
    for seen in origin.seen(path):
        if seen.range and seen.range != "bytes=0-0":
            starts.append(int(seen.range.removeprefix("bytes=").split("-")[0]))
    return starts


# -- happy paths


async def test_plain_download_with_sha256(tmp_path: Path) -> None:
    data = payload(300_000)
    sink = Sink()
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m.gguf", data)
            dest = tmp_path / "m.gguf"
            await download_file(request(origin, "/m.gguf", dest, sha256=sha(data),
                                        size=len(data)), sink)
    assert data == dest.read_bytes()
    assert not partial_path(dest).exists()
    assert not sidecar_path(dest).exists()
    assert (len(data), len(data)) == (sink.done, sink.total)
    assert 0 == sink.resets
    assert [] == sink.retries
    assert origin.seen("/m.gguf")[0].if_range is None  # the probe


async def test_segmented_download_uses_several_connections(tmp_path: Path) -> None:
    data = payload(4 * MiB)
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m", data)
            origin.faults("/m").throttle = 16 * MiB  # per connection: pieces overlap in time
            dest = tmp_path / "m"
            await download_file(request(origin, "/m", dest, sha256=sha(data), connections=4,
                                        min_segment=MiB), Sink())
    assert data == dest.read_bytes()
    assert origin.max_active_connections >= 3
    assert len(set(ranges_seen(origin, "/m"))) >= 4
    assert len({s.connection for s in origin.seen("/m")}) >= 3
    assert origin.bytes_sent <= len(data) + 1


async def test_one_stream_below_min_segment(tmp_path: Path) -> None:
    data = payload(2 * MiB)
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m", data)
            await download_file(request(origin, "/m", tmp_path / "m", connections=8), Sink())
    assert [0] == ranges_seen(origin, "/m")


# -- resume


async def test_resume_after_cancel_uses_range_and_if_range(tmp_path: Path) -> None:
    data = payload(4 * MiB)
    dest = tmp_path / "m"
    with trio.fail_after(15):
        async with open_origin() as origin:
            res = origin.add("/m", data)
            origin.faults("/m").throttle = 8 * MiB
            req = request(origin, "/m", dest, sha256=sha(data), connections=1)
            await cancel_after(req, origin, 2 * MiB)
            await trio.sleep(0.2)  # a chunk the origin had in hand meets the closed socket
            assert partial_path(dest).exists()
            kept = partial_bytes(dest)
            assert kept >= MiB  # written in ~1 MiB steps; at most one buffer is lost
            sent_before = origin.bytes_sent
            origin.faults("/m").throttle = None
            sink = Sink()
            await download_file(req, sink)
    assert data == dest.read_bytes()
    assert 0 == sink.resets
    resumed = [s for s in origin.seen("/m") if s.range == f"bytes={kept}-{len(data) - 1}"]
    assert 1 == len(resumed)
    assert res.etag == resumed[0].if_range
    assert len(data) - kept + 1 == origin.bytes_sent - sent_before
    assert origin.bytes_sent < 1.5 * len(data)


async def test_sidecar_survives_cancel(tmp_path: Path) -> None:
    data = payload(3 * MiB)
    dest = tmp_path / "m"
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m", data)
            origin.faults("/m").throttle = 4 * MiB
            await cancel_after(request(origin, "/m", dest, connections=1), origin, int(1.5 * MiB))
    side = json.loads(sidecar_path(dest).read_text())
    assert origin.url("/m") == side["url"]
    assert len(data) == side["total"]
    kept = partial_bytes(dest)
    assert MiB <= kept < len(data)
    assert [[0, kept]] == side["done"]
    assert len(data) == partial_path(dest).stat().st_size  # preallocated
    assert data[:kept] == partial_path(dest).read_bytes()[:kept]
    remove_partial(dest)
    assert 0 == partial_bytes(dest)
    assert not partial_path(dest).exists()


def _pump_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children()
            if "actors.pump_main" in " ".join(p.cmdline())]


async def test_killed_pump_process_fails_the_download_and_keeps_the_partial(
        tmp_path: Path) -> None:
    """The bytes move in a child process; if it dies (OOM killer, a signal), the download fails
    at once with a clear error, what was recorded stays, and the next call resumes."""
    data = payload(6 * MiB)
    dest = tmp_path / "m"
    with trio.fail_after(20):
        async with open_origin() as origin:
            origin.add("/m", data)
            origin.faults("/m").throttle = 4 * MiB
            req = request(origin, "/m", dest, sha256=sha(data), connections=1)
            failure: list[BaseException] = []

            async def run() -> None:
                try:
                    await download_file(req, Sink())
                except DownloadError as exc:
                    failure.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                await origin.wait_bytes_sent(2 * MiB)  # the pump child is running
                await trio.sleep(0.3)  # a progress frame or more has been recorded
                (child,) = _pump_children()
                child.kill()
                killed_at = trio.current_time()
            assert trio.current_time() - killed_at < 2
            (exc,) = failure
            assert "pump process exited unexpectedly" in str(exc)
            assert "download again to resume" in str(exc)
            assert "download_error" == exc.code  # type: ignore[attr-defined]
            kept = partial_bytes(dest)
            assert MiB <= kept < len(data)
            assert [] == _pump_children()  # reaped
            origin.faults("/m").throttle = None
            await download_file(req, Sink())
    assert data == dest.read_bytes()
    assert any(s.range == f"bytes={kept}-{len(data) - 1}" for s in origin.seen("/m"))


async def test_ctrl_c_at_a_terminal_does_not_stop_the_pump_process(tmp_path: Path) -> None:
    """SIGINT reaches the whole process group at a terminal; the daemon decides when its
    download stops, so the pump child ignores it."""
    data = payload(4 * MiB)
    dest = tmp_path / "m"
    with trio.fail_after(20):
        async with open_origin() as origin:
            origin.add("/m", data)
            origin.faults("/m").throttle = 8 * MiB
            req = request(origin, "/m", dest, sha256=sha(data), connections=1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(download_file, req, Sink())
                await origin.wait_bytes_sent(MiB)
                (child,) = _pump_children()
                child.send_signal(signal.SIGINT)
    assert data == dest.read_bytes()
    assert 1 == len([s for s in origin.seen("/m") if s.range != "bytes=0-0"])  # no retry


def test_partial_bytes_ignores_invalid_sidecar(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    partial_path(dest).write_bytes(b"x" * 10)
    assert 0 == partial_bytes(dest)
    sidecar_path(dest).write_text("{not json")
    assert 0 == partial_bytes(dest)
    sidecar_path(dest).write_text(json.dumps(
        {"url": "u", "etag": None, "last_modified": None, "total": 10, "done": [[0, 20]]}))
    assert 0 == partial_bytes(dest)


async def test_cancel_stops_bytes_within_100ms(tmp_path: Path) -> None:
    data = payload(64 * MiB)
    dest = tmp_path / "m"
    with trio.fail_after(15):
        async with open_origin() as origin:
            origin.add("/m", data)
            req = request(origin, "/m", dest, connections=4, min_segment=MiB)
            cancelled_at = await cancel_after(req, origin, 8 * MiB)
            sent = origin.bytes_sent
            await trio.sleep(0.3)
            assert sent == origin.bytes_sent
            assert 0 == origin.active_connections
    assert origin.last_byte_at - cancelled_at < 0.1
    assert partial_bytes(dest) > 0


# -- faults


async def test_reset_is_retried_and_resumes(tmp_path: Path) -> None:
    data = payload(MiB)
    sink = Sink()
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m", data)
            origin.faults("/m").reset_after = 300_000
            origin.faults("/m").reset_requests = 3  # the probe and two downloads
            await download_file(request(origin, "/m", tmp_path / "m", sha256=sha(data)), sink)
    assert data == (tmp_path / "m").read_bytes()
    assert 2 == len(sink.retries)
    # Each reset came after progress, so each retry is a first attempt again.
    assert [1, 1] == [attempt for attempt, _, _ in sink.retries]
    starts = ranges_seen(origin, "/m")
    assert 3 == len(starts)
    assert 0 == starts[0] and starts[1] > 0 and starts[2] > starts[1]


async def test_consecutive_resets_without_progress_give_up(tmp_path: Path) -> None:
    sink = Sink()
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m", payload(100_000))
            origin.faults("/m").reset_after = 0
            with pytest.raises(OriginUnreachable) as err:
                await download_file(request(origin, "/m", tmp_path / "m", retries=2), sink)
    assert "origin_unreachable" == err.value.code
    assert 2 == len(sink.retries)


async def test_stall_is_retried(tmp_path: Path) -> None:
    data = payload(MiB)
    sink = Sink()
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m", data)
            origin.faults("/m").stall_after = 200_000
            origin.faults("/m").stall_requests = 2
            start = trio.current_time()
            await download_file(request(origin, "/m", tmp_path / "m", sha256=sha(data),
                                        stall_timeout=0.3), sink)
            elapsed = trio.current_time() - start
    assert data == (tmp_path / "m").read_bytes()
    assert 1 == len(sink.retries)
    assert elapsed >= 0.3
    assert 0 == origin.active_connections


async def test_ignored_range_restarts_from_zero(tmp_path: Path) -> None:
    data = payload(3 * MiB)
    dest = tmp_path / "m"
    sink = Sink()
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m", data)
            origin.faults("/m").throttle = 4 * MiB
            req = request(origin, "/m", dest, sha256=sha(data), connections=1)
            await cancel_after(req, origin, int(1.5 * MiB))
            assert partial_bytes(dest) > 0
            origin.faults("/m").throttle = None
            origin.faults("/m").ignore_range = True
            await download_file(req, sink)
    assert data == dest.read_bytes()
    assert 1 == sink.resets
    assert not sidecar_path(dest).exists()


async def test_origin_without_ranges_single_stream(tmp_path: Path) -> None:
    data = payload(2 * MiB)
    sink = Sink()
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m", data)
            origin.faults("/m").ignore_range = True
            await download_file(request(origin, "/m", tmp_path / "m", sha256=sha(data),
                                        min_segment=MiB), sink)
    assert data == (tmp_path / "m").read_bytes()
    assert 0 == sink.resets
    assert 1 == origin.max_active_connections or len(origin.seen("/m")) == 2


async def test_etag_change_between_attempts_starts_over(tmp_path: Path) -> None:
    old, new = payload(3 * MiB, seed=1), payload(3 * MiB, seed=2)
    dest = tmp_path / "m"
    sink = Sink()
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m", old)
            origin.faults("/m").throttle = 4 * MiB
            await cancel_after(request(origin, "/m", dest, connections=1), origin, int(1.5 * MiB))
            origin.replace("/m", new)
            origin.faults("/m").throttle = None
            await download_file(request(origin, "/m", dest, sha256=sha(new)), sink)
    assert new == dest.read_bytes()
    assert 1 == sink.resets
    assert 0 == ranges_seen(origin, "/m")[-1]


async def test_etag_change_during_segmented_download_starts_over(tmp_path: Path) -> None:
    old, new = payload(4 * MiB, seed=1), payload(4 * MiB, seed=2)
    dest = tmp_path / "m"
    sink = Sink()
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m", old)
            origin.faults("/m").throttle = 8 * MiB
            async with trio.open_nursery() as nursery:
                nursery.start_soon(download_file, request(
                    origin, "/m", dest, sha256=sha(new), connections=2, min_segment=MiB), sink)
                await origin.wait_bytes_sent(MiB)
                origin.replace("/m", new)
    assert new == dest.read_bytes()
    assert sink.resets >= 1


async def test_503_retry_after_is_honoured(tmp_path: Path) -> None:
    data = payload(10_000)
    sink = Sink()
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m", data)
            origin.faults("/m").status = 503
            origin.faults("/m").status_requests = 1
            origin.faults("/m").retry_after = "1"
            start = trio.current_time()
            await download_file(request(origin, "/m", tmp_path / "m"), sink)
            elapsed = trio.current_time() - start
    assert data == (tmp_path / "m").read_bytes()
    assert [(1, 1.0, "HTTP 503 Service Unavailable")] == sink.retries
    assert elapsed >= 1.0


async def test_404_fails_at_once(tmp_path: Path) -> None:
    sink = Sink()
    with trio.fail_after(10):
        async with open_origin() as origin:
            with pytest.raises(OriginError) as err:
                await download_file(request(origin, "/missing", tmp_path / "m"), sink)
    assert "origin_error" == err.value.code
    assert "404" in str(err.value)
    assert 1 == len(origin.requests)
    assert [] == sink.retries


async def test_checksum_mismatch_leaves_nothing(tmp_path: Path) -> None:
    data = payload(100_000)
    dest = tmp_path / "m"
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m", data)
            with pytest.raises(ChecksumMismatch) as err:
                await download_file(request(origin, "/m", dest, sha256="0" * 64), Sink())
    assert "checksum_mismatch" == err.value.code
    assert [] == listdir(tmp_path)


async def test_size_mismatch(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m", payload(100_000))
            with pytest.raises(SizeMismatch) as err:
                await download_file(request(origin, "/m", tmp_path / "m", size=99_999), Sink())
    assert "size_mismatch" == err.value.code
    assert not (tmp_path / "m").exists()
    assert origin.bytes_sent <= 1  # found out from the probe


async def test_not_enough_disk_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: attrs.make_class(
        "Usage", ["total", "used", "free"])(10**9, 10**9, 1000))
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m", payload(100_000))
            with pytest.raises(DiskFull) as err:
                await download_file(request(origin, "/m", tmp_path / "m"), Sink())
    assert "disk_full" == err.value.code


async def test_origin_unreachable(tmp_path: Path) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with trio.fail_after(10), pytest.raises(OriginUnreachable):
            await download_file(DownloadRequest(f"http://127.0.0.1:{port}/m", tmp_path / "m",
                                                allow_http=True, retries=1), Sink())


# -- URLs and redirects


async def test_redirect_chain_is_followed(tmp_path: Path) -> None:
    data = payload(50_000)
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/real", data)
            origin.redirect("/a", "/b", status=301)
            origin.redirect("/b", "/real", status=307)
            await download_file(request(origin, "/a", tmp_path / "m", sha256=sha(data)), Sink())
    assert data == (tmp_path / "m").read_bytes()


async def test_too_many_redirects(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.redirect("/loop", "/loop")
            with pytest.raises(TooManyRedirects) as err:
                await download_file(request(origin, "/loop", tmp_path / "m"), Sink())
    assert "too_many_redirects" == err.value.code
    assert 11 == len(origin.requests)


async def test_redirect_to_other_scheme_refused(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.redirect("/m", "file:///etc/passwd")
            with pytest.raises(UrlRefused):
                await download_file(request(origin, "/m", tmp_path / "m"), Sink())


async def public_host(host: str, port: int) -> list[str]:
    """What the mocked origins' names stand for: a public address (no DNS query is made; the
    mock transport answers)."""
    return ["93.184.215.14"]


async def test_redirect_https_to_http_refused(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert "https" == request.url.scheme
        return httpx.Response(302, headers={"Location": "http://mirror.test/m"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(UrlRefused) as err:
            await download_file(DownloadRequest("https://hub.test/m", tmp_path / "m",
                                                allow_http=True), Sink(), client=client,
                                resolve=public_host)
    assert "url_refused" == err.value.code
    assert "https to plain http" in str(err.value)


@pytest.mark.parametrize(("url", "words"), [
    ("http://127.0.0.1:1/m", "allow_http"),
    ("https://user:secret@hub.test/m", "credentials"),
    ("ftp://hub.test/m", "scheme"),
    ("https:///m", "host"),
])
async def test_url_refused_before_any_request(tmp_path: Path, url: str, words: str) -> None:
    with pytest.raises(UrlRefused) as err:
        await download_file(DownloadRequest(url, tmp_path / "m"), Sink())
    assert words in str(err.value)
    assert "secret" not in str(err.value)
    assert [] == listdir(tmp_path)


# -- retry timing (fake transport, virtual time)


async def test_backoff_grows_then_gives_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(500)

    sink = Sink()
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(OriginError) as err:
            await download_file(DownloadRequest("https://hub.test/m", tmp_path / "m",
                                                retries=4), sink, client=client,
                                resolve=public_host)
    assert "500" in str(err.value)
    assert 5 == calls
    assert [1, 2, 3, 4] == [a for a, _, _ in sink.retries]
    for attempt, delay, _ in sink.retries:
        full = dl.BACKOFF_BASE * 2 ** (attempt - 1)
        assert full / 2 <= delay <= full


async def test_429_with_http_date_retry_after(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The probe honours an HTTP-date Retry-After (the probe is the daemon's; the bytes'
    answers follow the same rule in the pump, actors/heads.py)."""
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            when = email.utils.formatdate(time.time() + 20, usegmt=True)
            return httpx.Response(429, headers={"Retry-After": when})
        return httpx.Response(404)

    sink = Sink()
    start = trio.current_time()
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(OriginError, match="HTTP 404"):
            await download_file(DownloadRequest("https://hub.test/m", tmp_path / "m"), sink,
                                client=client, resolve=public_host)
    assert 2 == calls
    assert 1 == len(sink.retries)
    assert 18 <= sink.retries[0][1] <= 20
    assert trio.current_time() - start >= 18


def test_parse_retry_after() -> None:
    assert 7.0 == dl.parse_retry_after("7", 0.0)
    assert dl.RETRY_AFTER_CAP == dl.parse_retry_after("99999", 0.0)
    assert dl.parse_retry_after("soon", 0.0) is None
    now = 1_700_000_000.0
    assert 30.0 == dl.parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now)
    assert 0.0 == dl.parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now)


async def test_403_fails_without_retry(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403)

    sink = Sink()
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(DownloadError) as err:
            await download_file(DownloadRequest("https://hub.test/m", tmp_path / "m"), sink,
                                client=client, resolve=public_host)
    assert "origin_error" == err.value.code
    assert [] == sink.retries


# -- the origin itself, from a plain thread (as e2e tests with a daemon subprocess use it)


def test_origin_in_a_thread_serves_files_from_disk(tmp_path: Path) -> None:
    from tests.origin import run_origin_in_thread

    data = payload(100_000)
    (tmp_path / "f").write_bytes(data)
    with run_origin_in_thread() as origin:
        res = origin.add("/f", tmp_path / "f")
        ranged = httpx.get(origin.url("/f"), headers={"Range": "bytes=10-19"})
        stale = httpx.get(origin.url("/f"), headers={"Range": "bytes=10-", "If-Range": '"x"'})
        fresh = httpx.get(origin.url("/f"), headers={"Range": "bytes=-5",
                                                      "If-Range": res.last_modified})
        head = httpx.head(origin.url("/f"))
    assert (206, data[10:20]) == (ranged.status_code, ranged.content)
    assert f"bytes 10-19/{len(data)}" == ranged.headers["content-range"]
    assert (200, data) == (stale.status_code, stale.content)
    assert (206, data[-5:]) == (fresh.status_code, fresh.content)
    assert (str(len(data)), "bytes") == (head.headers["content-length"],
                                         head.headers["accept-ranges"])


@pytest.mark.parametrize("location", ["http://[::1", "https://exa mple.test/x",
                                      "https://example.test:99999/x", "//"])
async def test_malformed_redirect_location_fails_cleanly(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, location: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": location})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(DownloadError):  # a download failure, never a crash
            await download_file(DownloadRequest("https://hub.test/m", tmp_path / "m"), Sink(),
                                client=client, resolve=public_host)


async def test_a_size_the_probe_told_caps_the_body(tmp_path: Path) -> None:
    """No catalog size, but the origin's probe told one; the body then comes unsized and far
    longer: the pump stops one byte past the told size (size_mismatch), nothing published."""
    data = payload(1 * MiB, seed=3)
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m", data + b"\0" * (32 * MiB))
            origin.faults("/m").probe_size = len(data)
            with pytest.raises(SizeMismatch) as err:
                await download_file(request(origin, "/m", tmp_path / "m", retries=0), Sink())
    assert f"known size of {len(data)} bytes" in str(err.value)
    assert [] == listdir(tmp_path)
    assert origin.bytes_sent < 16 * MiB
