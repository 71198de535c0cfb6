"""Structured logs: one JSON object a line on stdout (`ts`, `level`, `event`, ...).

Library loggers (hypercorn, quart) go through the same renderer, so stdout stays JSON lines.
Secrets never reach a line: values under secret-sounding keys are replaced, and so is every
occurrence of a string registered with `hide_secret` (the API token), wherever a client put it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import structlog

SECRET_KEYS = frozenset({"token", "authorization", "password"})
REDACTED = "[redacted]"
MIN_SECRET_LENGTH = 4  # shorter strings would blank out ordinary words

_secrets: set[str] = set()
_observers: list[Callable[[dict[str, Any]], None]] = []


def observe_events(observer: Callable[[dict[str, Any]], None]) -> None:
    """From now on, show every structured event to `observer` (the daemon's metrics) before
    it is rendered. An observer must not change the event, nor raise."""
    _observers.append(observer)


def _notify(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for observer in _observers:
        try:
            observer(event)
        except Exception:  # a metric must never cost a log line
            pass
    return event


def hide_secret(secret: str) -> None:
    """From now on, replace `secret` (as is and JSON-escaped) in every rendered log line."""
    if len(secret) >= MIN_SECRET_LENGTH:
        _secrets.add(secret)
        _secrets.add(json.dumps(secret)[1:-1])


def scrub(line: str) -> str:
    for secret in _secrets:
        if secret in line:
            line = line.replace(secret, REDACTED)
    return line


def _redact(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in list(event):
        if key.lower() in SECRET_KEYS:
            event[key] = REDACTED
    return event


def setup_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        _redact,
    ]
    own = [*shared, _notify]  # modeld's own events, not the libraries' (foreign_pre_chain)
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[*own, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    # Tracebacks as data, without frame locals: those can hold request headers (a token).
    tracebacks: Any = _identity
    if fmt != "console":
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            tracebacks,
            renderer,
            _scrub_rendered,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO; modeld logs downloads itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # hypercorn's "Running on ..." sentence; modeld logs "listening" with the URLs itself.
    logging.getLogger("hypercorn.error").setLevel(logging.WARNING)


def _scrub_rendered(_logger: Any, _name: str, line: Any) -> Any:
    # The last step sees the whole rendered line, tracebacks included.
    return scrub(line) if isinstance(line, str) else line


def _identity(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return event
