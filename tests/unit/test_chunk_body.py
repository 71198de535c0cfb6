"""Request bodies as their chunks came (supervisor/api/body.py): handed on without a copy, in
order, ended by the end of the body; joined when awaited whole, also before an iteration."""

from __future__ import annotations

import trio

from supervisor.api.body import ChunkBody


async def test_chunks_are_handed_on_as_they_came_without_a_copy() -> None:
    body = ChunkBody(None, None)
    sent = [b"GGUF" * 1000, b"", b"x" * 5000, bytearray(b"tail")]
    got: list[bytes] = []

    async def read() -> None:
        async for chunk in body:
            got.append(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        for data in sent:
            await trio.lowlevel.checkpoint()
            body.append(data)  # type: ignore[arg-type]
        await trio.lowlevel.checkpoint()
        body.set_complete()
    assert [b"GGUF" * 1000, b"x" * 5000, b"tail"] == got
    assert got[0] is sent[0] and got[1] is sent[2]  # the same objects: nothing copied


async def test_awaited_whole_then_iterated() -> None:
    body = ChunkBody(None, None)
    body.append(b'{"a": ')
    body.append(b"1}")
    body.set_complete()
    assert b'{"a": 1}' == await body
    assert b'{"a": 1}' == await body  # kept, as quart's Body keeps it
    assert [b'{"a": 1}'] == [chunk async for chunk in body]
    assert [] == [chunk async for chunk in body]
