"""What an origin can do to a download without a sha256: change the file under the same ETag
between ranges (a resume compares the bytes just before it), or drip bytes inside the stall
timeout ([download] min_rate). Against the real origin (tests/origin.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from actors.download import TooSlow, download_file
from actors.partial import partial_bytes, partial_path
from tests.actors.test_download import MiB, Sink, cancel_after, payload, request
from tests.origin import Origin, open_origin


@contextlib.asynccontextmanager
async def open_origin_with(data: bytes) -> AsyncIterator[Origin]:
    """The origin serving `data` at /m, throttled so a cancel lands in the middle."""
    async with open_origin() as origin:
        origin.add("/m", data)
        origin.faults("/m").throttle = 8 * MiB
        yield origin


async def test_a_file_changed_under_the_same_etag_is_not_published_mixed(
        tmp_path: Path) -> None:
    old, new = payload(4 * MiB, seed=21), payload(4 * MiB, seed=22)
    dest = tmp_path / "m"
    with trio.fail_after(15):
        async with open_origin_with(old) as origin:
            req = request(origin, "/m", dest, connections=1)  # no sha256, no size
            await cancel_after(req, origin, 2 * MiB)
            await trio.sleep(0.2)
            kept = partial_bytes(dest)
            assert kept > 0 and partial_path(dest).exists()
            etag = origin.resources["/m"].etag
            origin.replace("/m", new, etag=etag)  # other bytes, the same ETag
            origin.faults("/m").throttle = None
            sink = Sink()
            await download_file(req, sink)
    assert new == dest.read_bytes()  # not old's front with new's back
    assert 1 == sink.resets and "changed" in sink.reasons[0]
    # The resume asked for 4 KiB before the partial's end, to compare them.
    assert any(s.range == f"bytes={kept - 4096}-{len(new) - 1}" for s in origin.seen("/m"))


async def test_a_resume_of_the_same_file_compares_and_goes_on(tmp_path: Path) -> None:
    data = payload(4 * MiB, seed=23)
    dest = tmp_path / "m"
    with trio.fail_after(15):
        async with open_origin_with(data) as origin:
            req = request(origin, "/m", dest, connections=1)
            await cancel_after(req, origin, 2 * MiB)
            await trio.sleep(0.2)
            kept = partial_bytes(dest)
            origin.faults("/m").throttle = None
            sent_before = origin.bytes_sent
            sink = Sink()
            await download_file(req, sink)
    assert data == dest.read_bytes()
    assert 0 == sink.resets
    assert len(data) - kept + 1 + 4096 == origin.bytes_sent - sent_before


async def test_an_origin_that_drips_fails_at_min_rate(tmp_path: Path) -> None:
    """A few bytes a second, each well inside the stall timeout: the download fails once a
    whole window brought less than min_rate, its partial kept."""
    dest = tmp_path / "m"
    with trio.fail_after(10):
        async with open_origin_with(payload(MiB, seed=24)) as origin:
            origin.faults("/m").throttle = 20  # bytes a second: one every 50 ms
            began = time.monotonic()
            try:
                await download_file(request(origin, "/m", dest, stall_timeout=5.0,
                                            min_rate=1000.0, rate_window=1.0), Sink())
            except TooSlow as exc:
                assert "origin_too_slow" == exc.code
                assert "min_rate" in str(exc)
            else:
                raise AssertionError("the drip was not stopped")
    assert time.monotonic() - began < 3
    assert 0 < partial_bytes(dest) < 100
