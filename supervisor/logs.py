"""Structured logs: one JSON object a line on stdout (`ts`, `level`, `event`, ...).

Library loggers (hypercorn, quart) go through the same renderer, so stdout stays JSON lines.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

SECRET_KEYS = frozenset({"token", "authorization", "password"})


def _redact(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in list(event):
        if key.lower() in SECRET_KEYS:
            event[key] = "[redacted]"
    return event


def setup_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        _redact,
    ]
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    tracebacks: Any = structlog.processors.dict_tracebacks if fmt != "console" else _identity
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            tracebacks,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO; modeld logs downloads itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _identity(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return event
