"""The Pieces Model API routes (documented in supervisor/api/openapi.json)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import quart.wrappers
import structlog
import trio
from quart import Response, request, websocket
from quart_trio import QuartTrio

from actors import messages as m
from actors.disk import check_fits, free_bytes
from actors.errors import (
    Conflict,
    InvalidInput,
    ModelError,
    Unavailable,
)
from actors.keepalive import FOREVER, parse_keep_alive
from actors.spec import ModelSpec
from supervisor.api.app import error_response, json_reply, no_content
from supervisor.api.guard import (
    OCTET_STREAM,
    PayloadTooLarge,
    UnsupportedMediaType,
    accepts,
    bearer_subprotocol,
    check_model_id,
    is_json_media_type,
    media_type,
)
from supervisor.api.progress import CONNECTION_GONE, ProgressFeed
from supervisor.api.sources import RESOLVE_WAIT, create_from_source, pin_catalog_source
from supervisor.api.uploads import body_chunks, disk_errors_reported, receive_file
from supervisor.config import Config
from supervisor.registry import Registry
from supervisor.wire import (
    BodyError,
    model_json,
    parse_delete_cache,
    parse_model_body,
    progress_json,
    score_counters,
    spec_from_create,
    spec_from_update,
)

log = structlog.get_logger("modeld.api")

MAX_JSON_BODY = 1024 * 1024
MAX_JSON_DEPTH = 64

class _NeverRaised(Exception):
    pass


# quart >= 0.23 (Python 3.13) raises ClientDisconnectedError on receive/send after the client
# went away; quart 0.22 has no such class.
ClientDisconnectedError: type[Exception] = getattr(
    quart.wrappers, "ClientDisconnectedError", _NeverRaised
)


# A subscriber that goes away while we send or close. BusyResourceError included: hypercorn's
# trio server half-closes a dropped connection (send_eof) outside its send lock, so our own
# close frame can collide with it; the subscriber is gone either way.
SUBSCRIBER_GONE = (ClientDisconnectedError, *CONNECTION_GONE)


@contextlib.contextmanager
def answer_within(seconds: float) -> Iterator[None]:
    """Bound a wait for an actor; a late answer is a 503 the client may retry."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise Unavailable(f"no answer within {seconds:g} s; try again") from None


def _check_decoded(value: Any, limit: int) -> None:
    """Nesting within `limit`; every string (keys too) encodable as UTF-8: JSON escapes can
    smuggle lone surrogates (`"\\ud800"`) that no file or log line could hold later."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise InvalidInput("the JSON body is nested too deeply", code="invalid_body")
        if isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInput(
                    "the body holds a string that is not valid Unicode (a lone surrogate)",
                    code="invalid_body",
                ) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_body() -> Any:
    """The request's JSON body: 415 unless application/json, 413 over 1 MiB, 400 if invalid
    (not UTF-8, not JSON, NaN/Infinity, nested deeper than 64, lone surrogates)."""
    if not is_json_media_type(request.headers.get("content-type")):
        raise UnsupportedMediaType("send the body as Content-Type: application/json")
    length = request.content_length
    if length is not None and length > MAX_JSON_BODY:
        raise PayloadTooLarge("the JSON body is larger than 1 MiB")
    chunks: list[bytes] = []
    size = 0
    async for chunk in body_chunks():
        size += len(chunk)
        if size > MAX_JSON_BODY:
            raise PayloadTooLarge("the JSON body is larger than 1 MiB")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("the body is not valid UTF-8", code="invalid_body") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidInput("the JSON body is nested too deeply", code="invalid_body") from None
    except ValueError:
        raise InvalidInput("the body is not valid JSON", code="invalid_body") from None
    _check_decoded(data, MAX_JSON_DEPTH)
    return data


async def refuse_body() -> Any:
    """Commands without a body: a body, if any, must still be JSON (no simple CSRF posts).
    Returns it (None when there is none)."""
    if request.content_length or request.headers.get("transfer-encoding"):
        if not is_json_media_type(request.headers.get("content-type")):
            raise UnsupportedMediaType("send a body, if any, as Content-Type: application/json")
        return await read_json_body()
    return None


def update_asked(body: Any) -> bool:
    """A download's body may ask for an update (modeld extra: `{"update": true}`)."""
    value = body.get("update", False) if isinstance(body, dict) else False
    if not isinstance(value, bool):
        raise InvalidInput("update: expected true or false", code="invalid_body")
    return value


def load_keep_alive(body: Any) -> float:
    """An explicit load keeps the model until it is unloaded, unless its body gives a
    `keepAlive` (modeld extra: "5m", "0", "-1")."""
    value = body.get("keepAlive") if isinstance(body, dict) else None
    if value is None:
        return FOREVER
    try:
        return parse_keep_alive(value)
    except ValueError as exc:
        raise InvalidInput(f"keepAlive: {exc}", code="invalid_body") from None


def register_routes(app: QuartTrio, registry: Registry, config: Config,
                    feed: ProgressFeed) -> None:
    load_wait = config.runtime.load_wait + config.runtime.load_timeout + 30

    def render(view: m.ModelView, **extra: Any) -> dict[str, Any]:
        return model_json(view, update_available=registry.updates.available(view.spec), **extra)

    async def call(model: str, make: Any, *, wait: float = 30.0) -> Response:
        with answer_within(wait):
            view = await registry.call(check_model_id(model), make)
        return json_reply(render(view))

    @app.get("/model/<model>")
    async def snapshot(model: str) -> Response:
        return json_reply(render(registry.view(check_model_id(model))))

    @app.post("/model/<model>/download")
    async def download(model: str) -> Response:
        if update_asked(await refuse_body()):  # modeld: re-resolve the model's Hub source
            with answer_within(RESOLVE_WAIT):
                view, outcome = await registry.updates.update(check_model_id(model))
            return json_reply(render(view, update=outcome))
        with answer_within(RESOLVE_WAIT):  # a catalog model's source is resolved first
            await pin_catalog_source(registry, config, check_model_id(model))
        return await call(model, lambda r: m.StartDownload(reply=r))

    @app.post("/model/<model>/download/cancel")
    async def cancel(model: str) -> Response:
        await refuse_body()
        registry.updates.cancel(check_model_id(model))  # a Hub update's download too
        return await call(model, lambda r: m.CancelDownload(reply=r))

    @app.get("/model/<model>/download/progress")
    async def progress(model: str) -> Response:
        broadcaster = registry.broadcaster(check_model_id(model))
        return json_reply(progress_json(broadcaster.value))

    @app.websocket("/model/<model>/download/progress")
    async def progress_stream(model: str) -> Response | None:
        # Accepted handshakes are served by supervisor/api/progress.py before Quart sees them;
        # this route answers the rest (and any ASGI server that calls the Quart app itself).
        broadcaster = registry.broadcaster(check_model_id(model))
        await websocket.accept(subprotocol=bearer_subprotocol(websocket.requested_subprotocols))
        try:
            await feed.stream(model, broadcaster, websocket.send)
            await websocket.close(1000)
        except SUBSCRIBER_GONE:
            log.debug("progress_subscriber_left", model=model)
        return None

    @app.post("/model/<model>/load")
    async def load(model: str) -> Response:
        keep_alive = load_keep_alive(await refuse_body())
        model_id = check_model_id(model)
        with answer_within(load_wait):
            view = await registry.call(model_id, lambda r: m.Load(reply=r,
                                                                  keep_alive=keep_alive))
        # modeld extra: the models [runtime] max_loaded unloaded to make room
        return json_reply(render(view, evicted=registry.gate.take_evicted(model_id)))

    @app.post("/model/<model>/unload")
    async def unload(model: str) -> Response:
        await refuse_body()
        return await call(model, lambda r: m.Unload(reply=r))

    @app.post("/model/update")
    async def update() -> Response:
        body = parse_model_body(await read_json_body())
        if body.id is None:
            raise InvalidInput("$.id: required", code="invalid_body")
        model_id = check_model_id(body.id)

        def change(current: ModelSpec) -> ModelSpec:
            if not current.custom:
                raise Conflict(
                    "only custom models can be updated; catalog models come from the config "
                    "file",
                    code="not_custom",
                )
            if current.source is not None and (body.url not in (None, current.url)
                                               or body.sha256 not in (None, current.sha256)):
                raise InvalidInput(
                    f"$.url: this model is pinned to {current.file} of {current.source}; its url "
                    "and sha256 are the Hub's (create another model for another file)",
                    code="source_pinned")
            try:
                return spec_from_update(body, current, allow_http=config.download.allow_http)
            except BodyError as exc:  # told to the caller as a 400 by the actor
                raise InvalidInput(str(exc), code="invalid_body") from None

        return await call(model_id, lambda r: m.UpdateSpec(reply=r, change=change))

    @app.put("/model/<model>/file")
    @accepts(OCTET_STREAM)
    async def put_file(model: str) -> Response:
        model_id = check_model_id(model)
        current = registry.view(model_id)
        if not current.spec.custom:
            raise Conflict("only custom models take an uploaded file", code="not_custom")
        if media_type(request.headers.get("content-type")) != OCTET_STREAM:
            raise UnsupportedMediaType("send the file as Content-Type: application/octet-stream")
        received = False  # the whole body: from then on the actor decides
        try:
            if request.content_length is not None:  # refused before any byte if it cannot fit
                free = await trio.to_thread.run_sync(
                    free_bytes, registry.store.model_path(model_id).parent)
                check_fits(request.content_length, free, "the upload", config.storage.min_free)
            with disk_errors_reported():
                temp = await trio.to_thread.run_sync(registry.store.import_temp, model_id)
            try:
                try:
                    with disk_errors_reported():
                        sha256 = await receive_file(temp)
                except InvalidInput as exc:
                    # Refused before the whole body came: the connection cannot be reused (the
                    # rest of the body is still on its way), so it is closed after the answer
                    # instead of left waiting for a client that waits for us.
                    response = error_response(exc.code, str(exc), 400)
                    response.headers["Connection"] = "close"
                    return response
                received = True
                return await call(model_id,
                                  lambda r: m.ImportFile(reply=r, temp=temp, sha256=sha256),
                                  wait=load_wait)
            finally:
                # The actor takes the file (publishing or deleting it); if the command never
                # reached it (model deleted meanwhile, timeout, disconnect), it goes here, in a
                # thread (freeing a large file's blocks takes a while), whatever cancels.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_remove, temp)
        except trio.Cancelled:
            # The client left before its whole file came (hypercorn cancels the handler, at
            # any await up to here): a model with neither a url nor a file is useless, and goes.
            if not received:
                with contextlib.suppress(RuntimeError):  # the registry is ending too
                    registry.start_soon(registry.forget_cut_import, model_id)
            raise

    @app.get("/models")
    async def models() -> Response:
        views = registry.views()
        return json_reply({"iterable": [render(v) for v in views]})

    @app.post("/models/create")
    async def create() -> Response:
        body = parse_model_body(await read_json_body())
        if body.source is not None:  # a Hub reference: resolved and pinned first
            with answer_within(RESOLVE_WAIT):
                return json_reply(render(await create_from_source(registry, config, body)))
        spec = spec_from_create(body, "new", allow_http=config.download.allow_http)
        with answer_within(30), disk_errors_reported():  # its record: 507 on a full disk
            view = await registry.create(spec)
        return json_reply(render(view))

    @app.post("/models/<model>/delete")
    async def delete(model: str) -> Response:
        await refuse_body()
        with answer_within(90):
            await registry.delete(check_model_id(model))
        return no_content()

    @app.post("/model/<model>/scores/increment")
    async def scores_increment(model: str) -> Response:
        counters = score_counters(await read_json_body())
        model_id = check_model_id(model)

        def count(current: ModelSpec) -> ModelSpec:
            return attrs.evolve(current, score=current.score.plus(counters))

        await call(model_id, lambda r: m.UpdateSpec(reply=r, change=count))
        return no_content()

    @app.post("/models/<model>/delete/cache")
    async def delete_cache(model: str) -> Response:
        if await request.get_data():  # the SDK sends {} (or {"schema": ...}); nothing to read
            parse_delete_cache(await read_json_body())
        model_id = check_model_id(model)
        with answer_within(90):
            await registry.call(model_id, lambda r: m.Delete(reply=r))
        return json_reply({"model": {"id": model_id}})

    @app.post("/models/unload")
    async def unload_all() -> Response:
        await refuse_body()
        async with trio.open_nursery() as nursery:
            for model_id in registry.ids():
                nursery.start_soon(_unload_quietly, registry, model_id)
        return no_content()


async def _unload_quietly(registry: Registry, model_id: str) -> None:
    try:
        with answer_within(30):
            await registry.call(model_id, lambda r: m.Unload(reply=r))
    except ModelError as exc:
        log.warning("unload_failed", model=model_id, reason=str(exc))


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
