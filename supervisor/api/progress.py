"""The download progress WebSocket (CONTRACT §3), shared by every subscriber of a model.

`ProgressFeed` encodes the messages: one JSON text per snapshot, shared by all of a model's
subscribers. Snapshots are throttled where they are made (actors.progress.ProgressMeter, ~10 a
second); here only many subscribers are paced, so that together they stay within
WS_SENDS_PER_SECOND (latest value wins; RESET and terminal snapshots are never skipped).

`with_lean_progress` serves accepted progress handshakes straight on ASGI. A download may have a
thousand subscribers, and Quart's per-connection machinery (a request context, a copy of the
headers, a message channel and two more tasks) costs each of them memory and the handshake CPU
time. Only a handshake that the guard accepts, for a valid id of a model that exists, is served
here, with the same checks as the Quart route; anything else goes on to the Quart route
(supervisor/api/models.py), which refuses it with the usual status, JSON error and log line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

import structlog
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope, WebsocketScope

from actors import messages as m
from actors.errors import ModelError
from actors.progress import Broadcaster
from supervisor.api.guard import Guard, Incoming, bearer_subprotocol, check_model_id
from supervisor.registry import Registry
from supervisor.wire import progress_json

log = structlog.get_logger("modeld.api")

WS_SENDS_PER_SECOND = 2000  # all subscribers of one model together
PROGRESS_PATH = re.compile(r"/model/(?P<model>[^/]+)/download/progress")

# The connection broke under a send (hypercorn half-closes a dropped connection outside its
# send lock, so a send can also collide with that); the subscriber is gone either way.
CONNECTION_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError)

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


class ProgressFeed:
    def __init__(self) -> None:
        self._subscribers: dict[str, int] = {}
        self._encoded: dict[str, tuple[m.Progress, str]] = {}

    def encode(self, snapshot: m.Progress) -> str:
        """One JSON text per snapshot, shared by every subscriber of the model."""
        cached = self._encoded.get(snapshot.model)
        if cached is None or cached[0] is not snapshot:
            cached = self._encoded[snapshot.model] = (snapshot, json.dumps(progress_json(snapshot)))
        return cached[1]

    async def stream(self, model: str, broadcaster: Broadcaster[m.Progress],
                     send_text: Callable[[str], Awaitable[None]]) -> None:
        """Send the current snapshot, every change (paced), and return after the terminal
        one. The caller closes the connection."""
        self._subscribers[model] = self._subscribers.get(model, 0) + 1
        try:
            async for snapshot in broadcaster.subscribe():
                await send_text(self.encode(snapshot))
                if snapshot.terminal:
                    return
                await trio.sleep(self._subscribers[model] / WS_SENDS_PER_SECOND)
        finally:
            self._subscribers[model] -= 1
            if not self._subscribers[model]:
                del self._subscribers[model]
                self._encoded.pop(model, None)


def handshake_incoming(scope: WebsocketScope) -> Incoming:
    """What the guard looks at in a WebSocket handshake, read from its ASGI scope."""
    query = parse_qs(scope["query_string"].decode("latin-1"))
    return Incoming.create(
        "GET",
        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
        target=scope["raw_path"].decode("latin-1"),
        query_token=query["token"][0] if "token" in query else None,
        subprotocols=scope["subprotocols"],
    )


def with_lean_progress(app: ASGIApp, registry: Registry, guard: Guard,
                       feed: ProgressFeed) -> ASGIApp:
    async def serve(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "websocket":
            match = PROGRESS_PATH.fullmatch(scope["path"])
            if match is not None:
                try:
                    incoming = handshake_incoming(scope)
                    guard.check(incoming)
                    model = check_model_id(match["model"])
                    broadcaster = registry.broadcaster(model)
                except ModelError:
                    pass  # the Quart route refuses it, with the usual answer and log line
                else:
                    await _serve(model, broadcaster, incoming, receive, send, feed)
                    return
        await app(scope, receive, send)

    return serve


async def _serve(model: str, broadcaster: Broadcaster[m.Progress], incoming: Incoming,
                 receive: ASGIReceiveCallable, send: ASGISendCallable,
                 feed: ProgressFeed) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept",
                "subprotocol": bearer_subprotocol(incoming.subprotocols), "headers": []})

    async def send_text(text: str) -> None:
        await send({"type": "websocket.send", "bytes": None, "text": text})

    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            # Whatever the client sends is ignored; its leaving ends the stream at once.
            while (await receive())["type"] != "websocket.disconnect":
                pass
            log.debug("progress_subscriber_left", model=model)
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        try:
            await feed.stream(model, broadcaster, send_text)
            await send({"type": "websocket.close", "code": 1000, "reason": None})
        except CONNECTION_GONE:
            log.debug("progress_subscriber_left", model=model)
        nursery.cancel_scope.cancel()
