"""supervisor/api/progress.py on plain ASGI messages: which handshakes it serves itself, and a
subscriber that leaves before the download ends."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from actors import messages as m
from actors.errors import ModelNotFound
from actors.progress import Broadcaster
from supervisor.api.guard import Guard
from supervisor.api.progress import ProgressFeed, with_lean_progress

TOKEN = "s3cret-token"


class Models:
    """The one Registry method the progress socket uses."""

    def __init__(self) -> None:
        self.progress = {"m": Broadcaster(m.Progress("m", "IN-PROGRESS", 10.0, 10, 100))}

    def broadcaster(self, model_id: str) -> Broadcaster[m.Progress]:
        try:
            return self.progress[model_id]
        except KeyError:
            raise ModelNotFound(f"no model with id {model_id!r}") from None


def handshake(path: str, headers: list[tuple[bytes, bytes]] | None = None,
              query: bytes = b"", subprotocols: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "scheme": "ws", "path": path, "raw_path": path.encode(), "query_string": query,
        "root_path": "", "headers": [(b"host", b"127.0.0.1:1000"), *(headers or [])],
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 1000),
        "subprotocols": list(subprotocols), "state": {}, "extensions": {},
    }


class Harness:
    def __init__(self, token: str | None = None) -> None:
        self.models = Models()
        self.passed_on: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self.to_app, self.inbox = trio.open_memory_channel[dict[str, Any]](10)

        async def quart(scope: Any, receive: Any, send: Any) -> None:
            self.passed_on.append(scope)

        self.serve = with_lean_progress(quart, self.models,  # type: ignore[arg-type]
                                        Guard.create([], [], token), ProgressFeed())

    async def send(self, message: Any) -> None:
        self.sent.append(message)

    async def run(self, scope: dict[str, Any]) -> None:
        await self.serve(scope, self.inbox.receive, self.send)  # type: ignore[arg-type]


async def test_a_subscriber_that_leaves_ends_its_stream_at_once() -> None:
    h = Harness()
    await h.to_app.send({"type": "websocket.connect"})
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.run, handshake("/model/m/download/progress"))
            await trio.testing.wait_all_tasks_blocked()
            assert ["websocket.accept", "websocket.send"] == [s["type"] for s in h.sent]
            assert "IN-PROGRESS" == json.loads(h.sent[1]["text"])["status"]
            await h.to_app.send({"type": "websocket.disconnect", "code": 1001})
    # It returned although the download never ended, and sent nothing more.
    assert 2 == len(h.sent)
    assert [] == h.passed_on


async def test_stream_ends_with_the_terminal_snapshot_and_a_normal_close() -> None:
    h = Harness()
    await h.to_app.send({"type": "websocket.connect"})
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.run, handshake("/model/m/download/progress"))
            await trio.testing.wait_all_tasks_blocked()
            h.models.progress["m"].publish(m.Progress("m", "COMPLETED", 100.0, 100, 100))
    assert ["websocket.accept", "websocket.send", "websocket.send", "websocket.close"] == [
        s["type"] for s in h.sent]
    assert "COMPLETED" == json.loads(h.sent[2]["text"])["status"]
    assert 1000 == h.sent[3]["code"]


@pytest.mark.parametrize("scope", [
    handshake("/model/m/download/progress", [(b"origin", b"http://evil.example")]),
    handshake("/model/m/download/progress", [(b"origin", b"null")]),
    handshake("/model/m/download/progress", [(b"sec-fetch-site", b"cross-site")]),
    handshake("/model/nosuch/download/progress"),
    handshake("/model/bad%20id!/download/progress"),
    handshake("/model/m/download/progress/extra"),
])
async def test_what_the_guard_refuses_goes_to_the_quart_route(scope: dict[str, Any]) -> None:
    h = Harness()
    with trio.fail_after(5):
        await h.run(scope)
    assert [scope] == h.passed_on
    assert [] == h.sent


async def test_token_in_subprotocol_or_query_is_served_lean_and_missing_is_not() -> None:
    for scope, lean in [
        (handshake("/model/m/download/progress"), False),
        (handshake("/model/m/download/progress", query=b"token=wrong"), False),
        (handshake("/model/m/download/progress", query=f"token={TOKEN}".encode()), True),
        (handshake("/model/m/download/progress", subprotocols=(f"bearer.{TOKEN}",)), True),
    ]:
        h = Harness(token=TOKEN)
        await h.to_app.send({"type": "websocket.connect"})
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(h.run, scope)
                await trio.testing.wait_all_tasks_blocked()
                await h.to_app.send({"type": "websocket.disconnect", "code": 1001})
        assert lean == (h.passed_on == []), scope
        if lean and scope["subprotocols"]:
            assert f"bearer.{TOKEN}" == h.sent[0]["subprotocol"]
