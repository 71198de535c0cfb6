"""Request bodies as their chunks came (supervisor/api/body.py): handed on without a copy, in
order, ended by the end of the body; joined when awaited whole, also before an iteration."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from supervisor.api import body as body_module
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


async def test_reading_pauses_while_a_body_holds_its_buffer(
        monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock) -> None:
    monkeypatch.setattr(body_module, "BODY_BUFFER", 10)
    body = ChunkBody(None, None)
    for data in (b"12345", b"67890", b"abc"):  # 13 bytes held: over the 10
        body.append(data)
    with trio.move_on_after(60) as waited:
        await body.room()
    assert waited.cancelled_caught  # no room while nothing is read
    assert b"12345" == await anext(aiter(body))
    with trio.fail_after(1):
        await body.room()  # 8 bytes held: room again


async def test_a_body_awaited_whole_is_never_paused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(body_module, "BODY_BUFFER", 10)
    body = ChunkBody(None, None)
    async with trio.open_nursery() as nursery:
        got: list[bytes] = []

        async def whole() -> None:
            got.append(await body)

        nursery.start_soon(whole)
        await trio.testing.wait_all_tasks_blocked()
        for data in (b"12345", b"67890", b"abc"):
            with trio.fail_after(1):
                await body.room()
            body.append(data)
        body.set_complete()
    assert [b"1234567890abc"] == got
