"""The one frame codec of the daemon's children (actors/frames.py), fuzzed: whatever bytes
arrive, a reader returns frames, None at a clean end, or FrameError; it never hangs."""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.frames import (
    MAX_FRAME,
    FrameCut,
    FrameError,
    FrameReader,
    FrameWriter,
    encode_frame,
    read_frame,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
objects = st.dictionaries(st.text(), json_values, max_size=6)


def read_all_blocking(data: bytes) -> list[Any]:
    """Every frame in `data` through `read_frame` on a pipe whose writer is closed, ending with
    None or the FrameError raised. A pipe at EOF cannot block: a hang would be a bug."""
    r, w = os.pipe()
    try:
        with os.fdopen(w, "wb") as out:  # fits the pipe: the tests keep data small
            out.write(data)
        found: list[Any] = []
        while True:
            try:
                frame = read_frame(r)
            except FrameError as exc:
                return [*found, exc]
            found.append(frame)
            if frame is None:
                return found
    finally:
        os.close(r)


async def read_all_async(data: bytes, chunk: int) -> list[Any]:
    send, receive = trio.testing.memory_stream_one_way_pair()
    reader = FrameReader(receive)
    for i in range(0, len(data), chunk):
        await send.send_all(data[i : i + chunk])
    await send.aclose()
    found: list[Any] = []
    with trio.fail_after(5):
        while True:
            try:
                frame = await reader.receive()
            except FrameError as exc:
                return [*found, exc]
            found.append(frame)
            if frame is None:
                return found


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(objects, max_size=5))
def test_frames_round_trip_on_both_readers(messages: list[dict[str, Any]]) -> None:
    data = b"".join(encode_frame(m) for m in messages)
    assert [*messages, None] == read_all_blocking(data)
    assert [*messages, None] == trio.run(read_all_async, data, 7)


@settings(max_examples=150)
@given(st.binary(max_size=2048), st.integers(min_value=1, max_value=64))
def test_garbage_is_an_error_or_frames_never_a_hang(data: bytes, chunk: int) -> None:
    blocking = read_all_blocking(data)
    assert blocking[-1] is None or isinstance(blocking[-1], FrameError)
    assert all(isinstance(f, dict) for f in blocking[:-1])
    on_trio = trio.run(read_all_async, data, chunk)
    assert [type(x) for x in blocking] == [type(x) for x in on_trio]


@settings(max_examples=60)
@given(objects, st.data())
def test_a_truncated_frame_is_an_error(message: dict[str, Any], data: st.DataObject) -> None:
    whole = encode_frame(message)
    cut = data.draw(st.integers(min_value=1, max_value=len(whole) - 1))
    (error,) = read_all_blocking(whole[:cut])
    assert isinstance(error, FrameCut)
    (error,) = trio.run(read_all_async, whole[:cut], 3)
    assert isinstance(error, FrameCut)


@given(st.integers(min_value=MAX_FRAME + 1, max_value=2**32 - 1))
def test_an_oversized_header_is_an_error_before_its_body(length: int) -> None:
    header = struct.pack(">I", length)
    (error,) = read_all_blocking(header)
    assert "exceeds" in str(error)
    (error,) = trio.run(read_all_async, header, 4)
    assert "exceeds" in str(error)


@pytest.mark.parametrize("body", [b"[1, 2]", b"\xff\xfe", b'{"a": ', b"null", b"[" * 50_000])
def test_bodies_that_are_not_an_object_are_errors(body: bytes) -> None:
    (error,) = read_all_blocking(struct.pack(">I", len(body)) + body)
    assert isinstance(error, FrameError)


def test_what_cannot_be_sent_is_refused_before_sending() -> None:
    with pytest.raises(FrameError, match="not valid Unicode"):
        encode_frame({"text": "\ud83d"})
    with pytest.raises(FrameError, match="exceeds"):
        encode_frame({"text": "x" * (MAX_FRAME + 1)})


def test_writer_and_reader_across_a_pipe() -> None:
    r, w = os.pipe()
    with os.fdopen(w, "wb", buffering=0) as out:
        FrameWriter(out).send({"op": "hash", "upto": 5})
    try:
        assert {"op": "hash", "upto": 5} == read_frame(r)
        assert read_frame(r) is None
    finally:
        os.close(r)
