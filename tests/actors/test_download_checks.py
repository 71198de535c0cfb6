"""actors/download/ against a real origin: bytes that are not a model file fail the download
and leave nothing; a partial that cannot resume is not kept, and a restart says why."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

from actors.download import DownloadRequest, FileInvalid, download_file
from actors.gguf import GGUF_MAGIC, inspect_gguf
from actors.messages import Progress
from actors.partial import partial_bytes, partial_path, sidecar_path
from actors.progress import PROGRESS_INTERVAL, ProgressMeter, progress_broadcaster
from tests.actors.test_download import Sink, cancel_after, request
from tests.gguf_factory import gguf_of_size
from tests.origin import open_origin

MiB = 1024 * 1024


def checked(url: str, dest: Path, **kw: object) -> DownloadRequest:
    """A request with the checks the model actor adds (magic first, then the whole header)."""
    return DownloadRequest(url, dest, allow_http=True, magic=GGUF_MAGIC,  # type: ignore[arg-type]
                           verify=inspect_gguf, **kw)


def nothing_left(dest: Path) -> bool:
    return not any(p.exists() for p in (dest, partial_path(dest), sidecar_path(dest)))


async def test_bytes_that_are_not_gguf_fail_at_once_and_leave_nothing(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(8 * MiB)
    dest = tmp_path / "m.gguf"
    with trio.fail_after(20):
        async with open_origin() as origin:
            origin.add("/m.gguf", data)
            origin.faults("/m.gguf").throttle = 1 * MiB  # per connection; 2 connections
            with pytest.raises(FileInvalid) as failed:
                await download_file(checked(origin.url("/m.gguf"), dest, connections=2), Sink())
    assert "model_file_invalid" == failed.value.code
    assert "is not a GGUF file" in str(failed.value)
    assert nothing_left(dest)
    assert origin.bytes_sent < len(data) // 2  # stopped by the first bytes, not the last


@pytest.mark.parametrize("ranges", [True, False])
async def test_a_damaged_header_is_refused_before_publishing(tmp_path: Path,
                                                             ranges: bool) -> None:
    data = bytearray(gguf_of_size(2 * MiB, seed=2))
    data[4:8] = struct.pack("<I", 99)  # GGUF version 99: the magic passes, the header does not
    dest = tmp_path / "m.gguf"
    with trio.fail_after(20):
        async with open_origin() as origin:
            origin.add("/m.gguf", bytes(data))
            origin.faults("/m.gguf").ignore_range = not ranges
            with pytest.raises(FileInvalid, match="version 99"):
                await download_file(checked(origin.url("/m.gguf"), dest), Sink())
    assert nothing_left(dest)


async def test_a_gguf_file_passes_the_checks(tmp_path: Path) -> None:
    data = gguf_of_size(3 * MiB, seed=3)
    dest = tmp_path / "m.gguf"
    with trio.fail_after(20):
        async with open_origin() as origin:
            origin.add("/m.gguf", data)
            await download_file(checked(origin.url("/m.gguf"), dest, size=len(data)), Sink())
    assert data == dest.read_bytes()


async def test_a_cancel_keeps_nothing_from_an_origin_without_ranges(tmp_path: Path) -> None:
    data = gguf_of_size(4 * MiB, seed=4)
    dest = tmp_path / "m.gguf"
    with trio.fail_after(20):
        async with open_origin() as origin:
            origin.add("/m.gguf", data)
            origin.faults("/m.gguf").ignore_range = True
            origin.faults("/m.gguf").throttle = 4 * MiB
            await cancel_after(request(origin, "/m.gguf", dest), origin, MiB)
    assert nothing_left(dest)


@pytest.mark.parametrize(("change", "reason"), [
    ("ignore_range", "the origin does not serve byte ranges, so the partial cannot be resumed"),
    ("replace", "the origin's file changed since the partial was downloaded (its ETag or "
                "Last-Modified differs)"),
    ("lose_sidecar", "the partial's record (its .partial.json sidecar) is missing or "
                     "unreadable"),
])
async def test_a_restart_names_its_reason(tmp_path: Path, change: str, reason: str) -> None:
    old, new = gguf_of_size(3 * MiB, seed=5), gguf_of_size(3 * MiB, seed=6)
    dest = tmp_path / "m.gguf"
    sink = Sink()
    with trio.fail_after(20):
        async with open_origin() as origin:
            origin.add("/m.gguf", old)
            origin.faults("/m.gguf").throttle = 4 * MiB
            await cancel_after(request(origin, "/m.gguf", dest, connections=1), origin, MiB)
            assert partial_bytes(dest) > 0
            origin.faults("/m.gguf").throttle = None
            if change == "ignore_range":
                origin.faults("/m.gguf").ignore_range = True
            elif change == "replace":
                origin.replace("/m.gguf", new)
            else:
                sidecar_path(dest).unlink()
            await download_file(request(origin, "/m.gguf", dest), sink)
    assert [reason] == sink.reasons
    assert (new if change == "replace" else old) == dest.read_bytes()


async def test_the_meter_logs_the_reason_and_publishes_reset() -> None:
    broadcaster = progress_broadcaster("m")
    meter = ProgressMeter("m", broadcaster)
    with structlog.testing.capture_logs() as logs:
        meter.reset("the origin ignored the Range request")
    assert Progress(model="m", status="RESET") == broadcaster.value
    assert [("download_reset", "the origin ignored the Range request")] == [
        (e["event"], e["reason"]) for e in logs]


async def test_the_meter_is_the_one_throttle_and_never_holds_back_a_reset(
        autojump_clock: trio.testing.MockClock) -> None:
    broadcaster = progress_broadcaster("m")
    meter = ProgressMeter("m", broadcaster)
    meter.update(1, 100)
    assert 1 == broadcaster.value.bytes
    meter.update(2, 100)  # within PROGRESS_INTERVAL of the last snapshot: held back
    assert 1 == broadcaster.value.bytes
    meter.reset("the file changed")  # at once, however recent the last snapshot
    assert "RESET" == broadcaster.value.status
    meter.update(3, 100)  # the first update after a RESET is never held back
    assert ("IN-PROGRESS", 3) == (broadcaster.value.status, broadcaster.value.bytes)
    meter.update(4, 100)
    assert 3 == broadcaster.value.bytes
    await trio.sleep(PROGRESS_INTERVAL)
    meter.update(5, 100)
    assert 5 == broadcaster.value.bytes
