"""What a caller asks of a download (`DownloadRequest`) and hears back while it runs
(`ProgressSink`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import attrs


@attrs.frozen
class DownloadRequest:
    url: str
    dest: Path  # final file; published only complete and verified
    sha256: str | None = None
    size: int | None = None
    connections: int = 8
    retries: int = 6
    stall_timeout: float = 30.0
    # A connection that brings fewer bytes a second than this over `rate_window` seconds fails
    # the download (`origin_too_slow`; [download] min_rate; 0: no minimum).
    min_rate: float = 0.0
    rate_window: float = 30.0
    allow_http: bool = False
    # Redirects from a public origin to private or loopback addresses ([download] allow_private).
    allow_private: bool = False
    min_segment: int = 8 * 1024 * 1024  # below this size one stream is used
    # Bytes of free space a download of unknown size leaves on the disk ([storage] min_free);
    # a known size is checked (and reserved) before the first byte instead.
    min_free: int = 64 * 1024 * 1024
    # What the file must start with, checked as soon as its first bytes are in.
    magic: bytes | None = None
    # Checks the complete file before it is published; blocking (run in a thread). Raises
    # GGUFInvalid for a file modeld cannot run (the rule `import` applies: actors.gguf).
    verify: Callable[[Path], object] | None = None
    # Extra request headers (a Hub token): sent only to the origin (scheme, host and port) of
    # `url`. A redirect to another origin drops them for the rest of the chain, so a CDN that
    # the origin redirects to never sees them (actors/download/origin.py: same_origin).
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), repr=False)


class ProgressSink(Protocol):
    """Where a download reports; throttling is the sink's business (actors.progress)."""

    def update(self, done: int, total: int | None, *, connections: int | None = None) -> None:
        """Called often; must be cheap. `connections`: how many are moving bytes now."""

    def reset(self, reason: str) -> None:
        """What was downloaded is dropped and the download starts over; `reason` says why."""

    def retrying(self, attempt: int, delay: float, reason: str) -> None: ...
