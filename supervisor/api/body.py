"""Request bodies kept as the chunks they came in, and read no faster than they are used.

quart's Body joins what arrives into one bytearray and copies it out again for each read: two
copies of every byte of an upload on the event loop. ChunkBody hands each chunk on as it came
(`async for chunk in request.body`), and joins only when the whole body is awaited (JSON bodies,
which are small). MAX_CONTENT_LENGTH is not used by modeld (bodies are limited per route), so
this body does not check it.

quart-trio reads a request's ASGI messages into its body as fast as they come, whatever the
handler does with them: an upload from a client faster than the disk would pile up in memory.
ModeldHTTPConnection asks for the next message only while less than BODY_BUFFER bytes wait in
the body (hypercorn then stops reading the socket, and TCP slows the client down), except for a
body awaited whole.
"""

from __future__ import annotations

import collections
from collections.abc import Generator
from typing import Any

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGIReceiveEvent
from quart.wrappers import Request
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers.request import TrioBody, TrioRequest

BODY_BUFFER = 16 * 1024 * 1024  # bytes of a request body held before its reading pauses


class ChunkBody(TrioBody):
    def __init__(self, expected_content_length: int | None,
                 max_content_length: int | None) -> None:
        super().__init__(expected_content_length, max_content_length)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._whole = False  # awaited whole: no limit on what is held
        self._room = trio.Event()
        self._room.set()

    async def room(self) -> None:
        """Until less than BODY_BUFFER bytes are held (or the body is awaited whole)."""
        await self._room.wait()

    def _took(self, size: int) -> None:
        self._buffered -= size
        if self._buffered < BODY_BUFFER:
            self._room.set()

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
            self._took(len(chunk))
            return chunk
        raise StopAsyncIteration()

    def __await__(self) -> Generator[Any, None, Any]:
        if self._must_raise is not None:
            raise self._must_raise
        self._whole = True
        self._room.set()
        yield from self._complete.wait().__await__()
        if self._must_raise is not None:
            raise self._must_raise
        if self._chunks:
            self._data += b"".join(self._chunks)
            self._chunks.clear()
            self._took(self._buffered)
        return bytes(self._data)

    def append(self, data: bytes) -> None:
        if data == b"" or self._must_raise is not None:
            return
        self._chunks.append(bytes(data))  # a bytes object is kept as is, not copied
        self._buffered += len(data)
        if self._buffered >= BODY_BUFFER and not self._whole and self._room.is_set():
            self._room = trio.Event()
        self._has_data.set()

    def clear(self) -> None:
        self._chunks.clear()
        self._data.clear()
        self._took(self._buffered)


class ModeldRequest(TrioRequest):
    body_class = ChunkBody


class ModeldHTTPConnection(TrioASGIHTTPConnection):
    async def handle_messages(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Request, receive: ASGIReceiveCallable
    ) -> None:
        body = request.body

        async def paced() -> ASGIReceiveEvent:
            if isinstance(body, ChunkBody):
                await body.room()
            return await receive()

        await super().handle_messages(nursery, request, paced)
