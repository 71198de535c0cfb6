"""The Quart-Trio app: the guard hooks, error mapping (the one place statuses are chosen), routes.

Every request and every WebSocket handshake passes the same checks, in this order, before any
handler runs (a refused handshake is answered with a plain HTTP error, never accepted):
Host and Origin (403), token (401), the media type of a mutating request (415), and the model id
in the path (400). Handlers then read bodies within limits (413, 400) and talk to actors.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio
from quart import Response, g, has_websocket_context, jsonify, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from actors.errors import (
    Conflict,
    InsufficientMemory,
    InsufficientStorage,
    InvalidInput,
    ModelError,
    ModelNotFound,
    OperationFailed,
    Unavailable,
)
from actors.store import StoreError
from supervisor import __version__
from supervisor.api.body import ModeldHTTPConnection, ModeldRequest
from supervisor.api.guard import (
    Guard,
    Incoming,
    PayloadTooLarge,
    Refused,
    Unauthorized,
    UnsupportedMediaType,
    body_media_type,
    check_media_type,
    check_model_id,
    needs_token,
)
from supervisor.api.progress import ASGIApp, ProgressFeed, with_lean_progress
from supervisor.config import Config
from supervisor.metrics import Metrics
from supervisor.registry import Registry
from supervisor.wire import BodyError

if TYPE_CHECKING:
    from supervisor.api.ops import Readiness

__all__ = [
    "READ_TIMEOUT", "PayloadTooLarge", "create_app", "create_asgi", "error_response",
    "json_reply", "no_content", "read_token",
]

log = structlog.get_logger("modeld.api")
FEED = "modeld.progress_feed"
METRICS = "modeld.metrics"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

STATUS: list[tuple[type[Exception], int]] = [
    (ModelNotFound, 410),
    (InvalidInput, 400),
    (BodyError, 400),
    (Conflict, 409),
    (Refused, 403),
    (Unauthorized, 401),
    (PayloadTooLarge, 413),
    (UnsupportedMediaType, 415),
    (InsufficientMemory, 507),
    (InsufficientStorage, 507),
    (Unavailable, 503),
    (OperationFailed, 500),
]

HTTP_CODES = {
    400: ("bad_request", "the request is malformed"),
    404: ("not_found", "no such endpoint"),
    405: ("method_not_allowed", "this endpoint does not accept that method"),
    408: ("request_timeout", "the request body did not arrive in time"),
    413: ("payload_too_large", "the request body is too large"),
    415: ("unsupported_media_type", "this endpoint does not accept that Content-Type"),
}

# What a browser page on an allowed origin may do (CORS); foreign origins never get this far.
CORS_METHODS = "GET, POST, PUT, OPTIONS"
READ_TIMEOUT = "MODELD_READ_TIMEOUT"  # app.config key: seconds a request body may stall
CORS_HEADERS = "Authorization, Content-Type"
SERVER_HEADER = f"modeld/{__version__}"


def error_response(code: str, message: str, status: int) -> Response:
    """modeld's error JSON; on the OpenAI-compatible /v1 paths, OpenAI's error shape."""
    if current_path().startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": None,
                                          "code": code}}
    else:
        body = {"error": code, "message": message}
    response = jsonify(body)
    response.status_code = status
    return response


def json_reply(data: Any, status: int = 200) -> Response:
    response = jsonify(data)
    response.status_code = status
    return response


def no_content() -> Response:
    """A 204. Built from bytes: Quart's default empty body is a sync iterable that it drains
    through asyncio, which fails under trio (after the status line went out)."""
    response = Response(b"", status=204)
    del response.headers["Content-Type"]
    return response


def status_for(exc: Exception) -> int:
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def current_path() -> str:
    """The path of the request or WebSocket being handled (error handlers serve both)."""
    return websocket.path if has_websocket_context() else request.path


def read_token(path: str) -> str | None:
    if not path:
        return None
    token = Path(path).expanduser().read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def create_app(registry: Registry, config: Config, *, token: str | None = None,
               readiness: Readiness | None = None, metrics: Metrics | None = None) -> QuartTrio:
    # No static folder: nothing under the working directory may ever be served.
    app = QuartTrio("modeld", static_folder=None)
    # Bodies as their chunks came, read no faster than used (supervisor/api/body.py).
    app.request_class = ModeldRequest
    app.asgi_http_class = ModeldHTTPConnection
    app.config["MAX_CONTENT_LENGTH"] = None  # bodies are limited per route (1 MiB for JSON)
    app.config["JSON_SORT_KEYS"] = False
    app.config[READ_TIMEOUT] = config.server.read_timeout
    # `//` in a path is not merged into a redirect (308 with an HTML body): it is a 404.
    app.url_map.merge_slashes = False
    guard = Guard.create(config.server.allowed_hosts, config.server.allowed_origins, token)
    feed = ProgressFeed()
    app.extensions[FEED] = feed
    metrics = metrics or Metrics()
    app.extensions[METRICS] = metrics

    def refuse(event: str, exc: ModelError) -> None:
        # Never the header values: they may hold the token.
        log.warning(event, path=current_path(), code=exc.code, reason=str(exc))

    @app.before_request
    async def check_request() -> None:
        g.modeld_began = time.perf_counter()
        incoming = Incoming.create(
            request.method,
            request.headers.items(),
            target=_raw_target(request.scope),
        )
        view = app.view_functions.get(request.endpoint) if request.endpoint else None
        try:
            guard.check(incoming, token=needs_token(view))
            if request.url_rule is not None and view is not None:
                check_media_type(incoming, body_media_type(view))
            _check_path_ids(request.view_args)
        except ModelError as exc:
            refuse("request_refused", exc)
            raise

    @app.before_websocket
    async def check_websocket() -> None:
        incoming = Incoming.create(
            "GET",
            websocket.headers.items(),
            target=_raw_target(websocket.scope),
            query_token=websocket.args.get("token"),
            subprotocols=websocket.requested_subprotocols,
        )
        try:
            guard.check(incoming)
            _check_path_ids(websocket.view_args)
        except ModelError as exc:
            refuse("websocket_refused", exc)
            raise

    @app.after_request
    async def add_headers(response: Response) -> Response:
        # Route templates, never raw paths: the labels stay bounded.
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method = request.method if request.method in KNOWN_METHODS else "other"
        metrics.requests.labels(method, route, str(response.status_code)).inc()
        began = getattr(g, "modeld_began", None)
        if began is not None:
            metrics.request_seconds.labels(method, route).observe(time.perf_counter() - began)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Server"] = SERVER_HEADER
        sent_body = Incoming.create(request.method, request.headers.items()).has_body()
        if response.status_code >= 400 and sent_body:
            # An error may be answered before the body is read; a client that then reuses the
            # connection would wait forever for hypercorn to read its next request.
            response.headers["Connection"] = "close"
        origin = request.headers.get("origin")
        if origin is not None and guard.origin_allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
                response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
                response.headers["Access-Control-Max-Age"] = "600"
        return response

    @app.errorhandler(ModelError)
    async def on_model_error(exc: ModelError) -> Response:
        status = status_for(exc)
        if status >= 500:
            log.error("request_failed", path=current_path(), code=exc.code, reason=str(exc))
        return error_response(exc.code, str(exc), status)

    @app.errorhandler(StoreError)
    async def on_store_error(exc: StoreError) -> Response:
        # The storage dir holds something modeld will not follow (e.g. a link out of it).
        log.error("storage_refused", path=current_path(), reason=str(exc))
        return error_response("storage_refused", str(exc), 500)

    @app.errorhandler(BodyError)
    async def on_body_error(exc: BodyError) -> Response:
        return error_response("invalid_body", str(exc), 400)

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code, message = HTTP_CODES.get(status, ("http_error", exc.name))
        return error_response(code, message, status)

    @app.errorhandler(Exception)
    async def on_unexpected(exc: Exception) -> Response:
        log.exception("request_crashed", path=current_path())
        return error_response("internal_error", "modeld hit an internal error; see its log", 500)

    from supervisor.api.models import register_routes
    from supervisor.api.openai import register_openai
    from supervisor.api.openapi import register_openapi
    from supervisor.api.ops import Readiness as _Readiness
    from supervisor.api.ops import register_ops
    from supervisor.api.page import register_page

    register_routes(app, registry, config, feed)
    register_ops(app, registry, readiness or _Readiness(), metrics)
    register_openapi(app)
    register_openai(app, registry, config)
    register_page(app, token_required=token is not None)
    return app


def create_asgi(registry: Registry, config: Config, *, token: str | None = None,
                readiness: Readiness | None = None, metrics: Metrics | None = None) -> ASGIApp:
    """What the daemon serves: the Quart-Trio app, with progress WebSockets served lean (see
    supervisor/api/progress.py)."""
    app = create_app(registry, config, token=token, readiness=readiness, metrics=metrics)
    guard = Guard.create(config.server.allowed_hosts, config.server.allowed_origins, token)
    return with_lean_progress(_closing_sends(app), registry, guard, app.extensions[FEED])


FINAL_SEND_BOUND = 30.0  # seconds the last send of a response may take, shielded


def _closing_sends(app: ASGIApp) -> ASGIApp:
    """Shield the last send of each HTTP response (bounded by FINAL_SEND_BOUND).

    After an answer with `Connection: close` whose request body was not all read, hypercorn
    closes the connection from inside that last send; the disconnect this reports makes
    quart-trio cancel the app, which cut the close short and left the connection open (a
    client that stopped sending then waited forever)."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_shielding_the_last(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                with trio.CancelScope(shield=True) as scope_:
                    scope_.deadline = trio.current_time() + FINAL_SEND_BOUND
                    await send(message)
            else:
                await send(message)

        await app(scope, receive, send_shielding_the_last)

    return wrapped


def _raw_target(scope: Any) -> str:
    raw = scope.get("raw_path") if isinstance(scope, dict) else None
    if isinstance(raw, bytes):
        return raw.decode("latin-1")
    return "/"


def _check_path_ids(view_args: dict[str, Any] | None) -> None:
    """Every `<model>` in a route is checked here, before the handler or any file system call."""
    model = (view_args or {}).get("model")
    if model is not None:
        check_model_id(model)
