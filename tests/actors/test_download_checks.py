"""actors/download.py against a real origin: bytes that are not a model file fail the download
and leave nothing; a partial that cannot resume is not kept, and a restart says why."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
import trio

from actors.download import DownloadRequest, FileInvalid, download_file
from actors.gguf import GGUF_MAGIC, inspect_gguf
from actors.partial import partial_path, sidecar_path
from tests.actors.test_download import Sink
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
