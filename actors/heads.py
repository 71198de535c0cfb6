"""The one judge of an origin's response heads, for the daemon (which probes the origin) and the
download pump child (which fetches the bytes, actors/pump_main.py): both import these rules, so
an answer is accepted or refused the same way wherever it arrives.

Standard library only: the pump child starts in a few tens of milliseconds.
"""

from __future__ import annotations

import email.utils
import http
import time
from collections.abc import Iterable

RETRY_AFTER_CAP = 120.0  # seconds: the longest Retry-After honoured


class Refused(Exception):
    """A response head that is not the answer asked for. `kind` says what follows:
    `changed` (the file is not the one the partial holds: start over), `transient` (retry,
    after `retry_after` seconds when the origin said), `origin` (the origin refuses: give up).
    `reason` is in plain words and names no URL; the caller adds which file it was."""

    def __init__(self, kind: str, reason: str, *, status: int = 0,
                 retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.status, self.retry_after = kind, reason, status, retry_after


def header_fields(headers: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Lower-cased names to their values, in order."""
    fields: dict[str, list[str]] = {}
    for name, value in headers:
        fields.setdefault(name.lower(), []).append(value.strip())
    return fields


def first(fields: dict[str, list[str]], name: str) -> str | None:
    values = fields.get(name)
    return values[0] if values else None


def content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """(first, last, total or None) of `bytes first-last/total`; first = last = -1 for
    `bytes */total`."""
    if value is None:
        return None
    unit, _, rest = value.strip().partition(" ")
    span, _, total = rest.partition("/")
    first_byte, _, last = span.partition("-")
    try:
        if unit != "bytes":
            return None
        size = None if total == "*" else int(total)
        if span == "*":
            return -1, -1, size
        return int(first_byte), int(last), size
    except ValueError:
        return None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or HTTP date), capped."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_CAP)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    delay: float = when.timestamp() - now
    return min(max(0.0, delay), RETRY_AFTER_CAP)


def phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def judge_status(status: int, fields: dict[str, list[str]]) -> None:
    """Any answer modeld reads a body (or a probe) from: a 2xx or 416 with an identity body.
    Raises Refused: `transient` for 408, 429 and 5xx, `origin` for the rest."""
    if 200 <= status < 300 or status == 416:
        encodings = [v.lower() for v in fields.get("content-encoding", [])]
        odd = [e for e in encodings if e != "identity"]
        if odd:
            raise Refused("origin", f"sent the file {odd[0]}-encoded although asked for "
                          "identity", status=status)
        return
    if status in (408, 429) or status >= 500:
        raise Refused("transient", f"HTTP {status} {phrase(status)}".rstrip(), status=status,
                      retry_after=parse_retry_after(first(fields, "retry-after"), time.time()))
    raise Refused("origin", f"answered HTTP {status}; check the model's url", status=status)


def judge_body(status: int, headers: Iterable[tuple[str, str]], *, start: int,
               total: int | None, etag: str | None, ranged: bool) -> None:
    """The answer to a GET of the file from byte `start`: with `ranged`, exactly the range
    asked for of the `total`-byte file with ETag `etag` (when both sides have one); without,
    the whole file (200). Raises Refused."""
    fields = header_fields(headers)
    if 300 <= status < 400:
        raise Refused("changed", f"the origin now redirects the file (HTTP {status})",
                      status=status)
    judge_status(status, fields)
    if not ranged:
        if status != 200:
            raise Refused("changed", f"the origin answered HTTP {status} instead of the file",
                          status=status)
        return
    if status == 200:
        raise Refused("changed", "the origin ignored the Range request and sent the whole "
                      "file (the file changed, or ranges are no longer served)", status=status)
    if status != 206:
        raise Refused("changed", f"the origin refused a range request (HTTP {status})",
                      status=status)
    ranges = fields.get("content-range", [])
    crange = content_range(ranges[0]) if len(ranges) == 1 else None
    if crange is None or crange[0] != start or crange[2] != total:
        raise Refused("changed", f"the origin's Content-Range ({', '.join(ranges) or None}) "
                      f"does not fit bytes {start}- of a {total}-byte file", status=status)
    now = first(fields, "etag")
    if etag and now and now != etag:
        raise Refused("changed", f"the origin's ETag changed from {etag} to {now}: the file "
                      "was replaced", status=status)
    if any("chunked" in v.lower() for v in fields.get("transfer-encoding", [])):
        raise Refused("transient", "the origin answered a range request with a chunked body",
                      status=status)
