"""actors/pump.py: the child that moves a download's bytes, where it fails to start or dies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from actors.pump import PumpFailed, PumpProcess, with_pump
from actors.pump_main import expected_answer


async def test_a_pump_that_cannot_start_is_a_clear_failure(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    ran: list[PumpProcess] = []

    async def body(pump: PumpProcess) -> None:
        ran.append(pump)

    try:
        with pytest.raises(PumpFailed) as err:
            await with_pump(fd, body, python=str(tmp_path / "no-python"))
    finally:
        os.close(fd)
    assert "died" == err.value.kind
    assert "cannot start the download's pump process" in err.value.reason
    assert [] == ran


async def test_hashing_in_the_child_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    data = os.urandom(3 * 1024 * 1024 + 123)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    got: list[tuple[int, str]] = []

    async def body(pump: PumpProcess) -> None:
        assert 1000 == await pump.hash_upto(1000)  # a part, then the rest from there
        reached = await pump.hash_upto(10 * len(data))  # stops at the end of the file
        got.append((reached, await pump.hexdigest()))
        await pump.hash_reset()
        await pump.hash_upto(len(data))
        got.append((pump.hashed, await pump.hexdigest()))

    try:
        with trio.fail_after(20):
            await with_pump(fd, body)
    finally:
        os.close(fd)
    digest = hashlib.sha256(data).hexdigest()
    assert [(len(data), digest), (len(data), digest)] == got


GOOD = [("Content-Range", "bytes 100-199/1000"), ("ETag", '"abc"'), ("Content-Length", "100")]


@pytest.mark.parametrize(("status", "headers", "expected"), [
    (206, GOOD, True),
    (206, [*GOOD, ("Content-Encoding", "identity")], True),
    (200, GOOD, False),  # the whole file: the parent decides (start over)
    (206, [("Content-Range", "bytes 0-99/1000")], False),  # not the range asked for
    (206, [("Content-Range", "bytes 100-199/2000")], False),  # another size: changed
    (206, [("Content-Range", "bytes 100-199/*")], False),
    (206, [("Content-Range", "bytes 100-199/1000"), ("ETag", '"new"')], False),
    (206, [*GOOD, ("Content-Range", "bytes 100-199/1000")], False),  # two ranges
    (206, [*GOOD, ("Content-Encoding", "gzip")], False),
    (206, [*GOOD, ("Transfer-Encoding", "chunked")], False),
    (206, [("ETag", '"abc"')], False),
])
def test_only_exactly_the_range_asked_for_skips_the_parents_judgement(
        status: int, headers: list[tuple[str, str]], expected: bool) -> None:
    msg = {"total": 1000, "etag": '"abc"'}
    assert expected == expected_answer(msg, 100, headers, status)
    assert not expected_answer({"total": None, "etag": None}, 100, GOOD, 206)
