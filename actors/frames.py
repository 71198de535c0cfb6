"""The frames the daemon and its child processes (inference workers, download pumps) exchange
over pipes: a 4-byte big-endian length, then that many bytes of UTF-8 JSON holding an object.

Both sides of both protocols use this module: `encode_frame` to send, `read_frame` (blocking,
in a child) or `FrameReader` (trio, in the daemon) to receive. Anything that is not a whole
frame of at most MAX_FRAME bytes holding a JSON object is a `FrameError`: a broken protocol is
reported, never waited on.

Standard library only (and trio for `FrameReader`, imported on use): children start fast.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import trio

MAX_FRAME = 64 * 1024 * 1024
HEADER = struct.Struct(">I")

Frame = dict[str, Any]


class FrameError(ValueError):
    """Bytes that are not a frame: too long, not UTF-8 JSON, not an object, or cut short."""


class FrameCut(FrameError):
    """The stream ended inside a frame: the other side died while writing it."""


def encode_frame(message: Frame) -> bytes:
    """The frame's bytes. Raises FrameError for what cannot be sent: text UTF-8 cannot carry
    (lone surrogates, which json.loads accepts from "\\ud83d" escapes), or a frame longer than
    MAX_FRAME; nothing is sent then."""
    try:
        body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError as exc:
        raise FrameError(f"the text is not valid Unicode ({exc.reason} at position "
                         f"{exc.start})") from None
    if len(body) > MAX_FRAME:
        raise FrameError(f"a frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """The body length a frame header announces. Raises FrameError above MAX_FRAME."""
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise FrameError(f"a frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return int(length)


def decode_body(body: bytes) -> Frame:
    """The object a frame's body holds. Raises FrameError."""
    try:
        message = json.loads(body.decode())
    except ValueError:  # UnicodeDecodeError and JSONDecodeError included
        raise FrameError("a frame that is not UTF-8 JSON") from None
    except RecursionError:
        raise FrameError("a frame nested too deeply") from None
    if not isinstance(message, dict):
        raise FrameError("a frame that is not a JSON object")
    return message


def _read_exactly(fd: int, n: int, *, at_start: bool) -> bytes | None:
    """n bytes from fd; None at end of stream before the first byte when `at_start`.
    Raises FrameError when the stream ends inside a frame."""
    chunks: list[bytes] = []
    while n > 0:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            if at_start and not chunks:
                return None
            raise FrameCut("the stream ended inside a frame")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> Frame | None:
    """The next frame from a blocking file descriptor, or None at the end of the stream.
    Raises FrameError."""
    header = _read_exactly(fd, HEADER.size, at_start=True)
    if header is None:
        return None
    body = _read_exactly(fd, frame_length(header), at_start=False)
    assert body is not None
    return decode_body(body)


class FrameWriter:
    """Writes frames to a blocking stream; a lock keeps frames from two threads whole."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, message: Frame) -> None:
        data = encode_frame(message)
        with self._lock:
            self._out.write(data)
            self._out.flush()


class FrameReader:
    """Frames from a trio stream (a child's stdout). The buffer outlives a cancelled receive,
    so a frame interrupted by a cancel is delivered whole to the next receive."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def receive(self) -> Frame | None:
        """The next frame, or None at the end of the stream (the child is gone or going).
        Raises FrameError, also for a stream that ends inside a frame."""
        while True:
            if len(self._buffer) >= HEADER.size:
                length = frame_length(bytes(self._buffer[: HEADER.size]))
                if len(self._buffer) >= HEADER.size + length:
                    body = bytes(self._buffer[HEADER.size : HEADER.size + length])
                    del self._buffer[: HEADER.size + length]
                    return decode_body(body)
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                if self._buffer:
                    raise FrameCut("the stream ended inside a frame")
                return None
            self._buffer += chunk
