"""Durations as modeld's config and requests write them ("15m", "30s", "1h30m", "500ms", a
number of seconds, "forever"), without the actor machinery of actors/keepalive.py, so that the
command line can read the config without importing trio."""

from __future__ import annotations

import math
import re

FOREVER = math.inf
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_keep_alive(value: object) -> float:
    """Seconds (FOREVER for a negative value or "forever"); ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError("a keep_alive is a duration such as \"15m\", \"0\" or \"-1\"")
    if isinstance(value, int | float):
        if math.isnan(value):
            raise ValueError("a keep_alive is not NaN")
        return FOREVER if value < 0 else float(value)
    if not isinstance(value, str):
        raise ValueError("a keep_alive is a duration such as \"15m\", \"0\" or \"-1\"")
    text = value.strip().lower()
    if text in ("forever", "inf", "infinite"):
        return FOREVER
    try:
        return parse_keep_alive(float(text))
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("-")
    if not body or _PART.sub("", body):
        raise ValueError(f"{value!r} is not a duration: use e.g. \"30s\", \"15m\", \"1h30m\", "
                         "\"0\" (unload when idle) or \"-1\" (keep until unloaded)")
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(body))
    return FOREVER if sign < 0 else seconds


def show_keep_alive(seconds: float | None) -> float | None:
    """For views: None for FOREVER (JSON null: kept until unloaded)."""
    return None if seconds is None or math.isinf(seconds) else seconds
