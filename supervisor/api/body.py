"""Request bodies kept as the chunks they came in.

quart's Body joins what arrives into one bytearray and copies it out again for each read: two
copies of every byte of an upload on the event loop. ChunkBody hands each chunk on as it came
(`async for chunk in request.body`), and joins only when the whole body is awaited (JSON bodies,
which are small). MAX_CONTENT_LENGTH is not used by modeld (bodies are limited per route), so
this body does not check it.
"""

from __future__ import annotations

import collections
from collections.abc import Generator
from typing import Any

from quart_trio.wrappers.request import TrioBody, TrioRequest


class ChunkBody(TrioBody):
    def __init__(self, expected_content_length: int | None,
                 max_content_length: int | None) -> None:
        super().__init__(expected_content_length, max_content_length)
        self._chunks: collections.deque[bytes] = collections.deque()

    async def __anext__(self) -> bytes:
        if self._must_raise is not None:
            raise self._must_raise
        if not self._chunks and not self._complete.is_set():
            await self._has_data.wait()
        if self._data:  # the body was awaited first: what it joined, as quart's Body does
            joined = bytes(self._data)
            self._data.clear()
            return joined
        if self._chunks:
            chunk = self._chunks.popleft()
            if not self._chunks:
                self._has_data.clear()
            return chunk
        raise StopAsyncIteration()

    def __await__(self) -> Generator[Any, None, Any]:
        if self._must_raise is not None:
            raise self._must_raise
        yield from self._complete.wait().__await__()
        if self._must_raise is not None:
            raise self._must_raise
        if self._chunks:
            self._data += b"".join(self._chunks)
            self._chunks.clear()
        return bytes(self._data)

    def append(self, data: bytes) -> None:
        if data == b"" or self._must_raise is not None:
            return
        self._chunks.append(bytes(data))  # a bytes object is kept as is, not copied
        self._has_data.set()

    def clear(self) -> None:
        self._chunks.clear()
        self._data.clear()


class ModeldRequest(TrioRequest):
    body_class = ChunkBody
