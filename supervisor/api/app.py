"""The Quart-Trio app: guard, error mapping (the one place statuses are chosen), routes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
from quart import Response, jsonify, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from actors.errors import (
    Conflict,
    InsufficientMemory,
    InvalidInput,
    ModelError,
    ModelNotFound,
    OperationFailed,
    Unavailable,
)
from supervisor.api.guard import (
    Guard,
    Refused,
    Unauthorized,
    UnsupportedMediaType,
    lower_headers,
)
from supervisor.config import Config
from supervisor.registry import Registry
from supervisor.wire import BodyError

log = structlog.get_logger("modeld.api")

STATUS: list[tuple[type[Exception], int]] = [
    (ModelNotFound, 410),
    (InvalidInput, 400),
    (BodyError, 400),
    (Conflict, 409),
    (Refused, 403),
    (Unauthorized, 401),
    (UnsupportedMediaType, 415),
    (InsufficientMemory, 507),
    (Unavailable, 503),
    (OperationFailed, 500),
]


class PayloadTooLarge(ModelError):
    code = "payload_too_large"


STATUS.insert(0, (PayloadTooLarge, 413))


def error_response(code: str, message: str, status: int) -> Response:
    response = jsonify({"error": code, "message": message})
    response.status_code = status
    return response


def status_for(exc: Exception) -> int:
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def read_token(path: str) -> str | None:
    if not path:
        return None
    token = Path(path).expanduser().read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def create_app(registry: Registry, config: Config, *, token: str | None = None) -> QuartTrio:
    app = QuartTrio("modeld")
    app.config["MAX_CONTENT_LENGTH"] = None  # bodies are limited per route (1 MiB for JSON)
    app.config["JSON_SORT_KEYS"] = False
    guard = Guard.create(config.server.allowed_hosts, config.server.allowed_origins, token)

    @app.before_request
    async def check_request() -> Response | None:
        try:
            guard.check(lower_headers(request.headers.items()))
        except ModelError as exc:
            log.warning("request_refused", path=request.path, code=exc.code, reason=str(exc))
            return error_response(exc.code, str(exc), status_for(exc))
        return None

    @app.before_websocket
    async def check_websocket() -> Response | None:
        offered = websocket.headers.get("sec-websocket-protocol", "")
        protocols = [p.strip() for p in offered.split(",") if p.strip()]
        try:
            guard.check(
                lower_headers(websocket.headers.items()),
                query_token=websocket.args.get("token"),
                subprotocols=protocols,
            )
        except ModelError as exc:
            log.warning("websocket_refused", path=websocket.path, code=exc.code, reason=str(exc))
            return error_response(exc.code, str(exc), status_for(exc))
        return None

    @app.errorhandler(ModelError)
    async def on_model_error(exc: ModelError) -> Response:
        status = status_for(exc)
        if status >= 500:
            log.error("request_failed", path=request.path, code=exc.code, reason=str(exc))
        return error_response(exc.code, str(exc), status)

    @app.errorhandler(BodyError)
    async def on_body_error(exc: BodyError) -> Response:
        return error_response("invalid_body", str(exc), 400)

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            status, "http_error"
        )
        message = {
            404: "no such endpoint",
            405: "this endpoint does not accept that method",
        }.get(status, exc.description or exc.name)
        return error_response(code, message, status)

    @app.errorhandler(Exception)
    async def on_unexpected(exc: Exception) -> Response:
        log.exception("request_crashed", path=request.path)
        return error_response("internal_error", "modeld hit an internal error; see its log", 500)

    from supervisor.api.models import register_routes

    register_routes(app, registry, config)
    return app


def json_reply(data: Any, status: int = 200) -> Response:
    response = jsonify(data)
    response.status_code = status
    return response
