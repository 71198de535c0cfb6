"""Download progress: a latest-value broadcaster, and the meter that feeds it during a download.

The producer never waits and memory does not grow with slow subscribers: each subscriber sees
the newest value, skipping what it was too slow to read, except the values the broadcaster was
told to keep (a RESET, a terminal status): those reach every subscriber, in order.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

import attrs
import structlog
import trio

from actors.messages import Progress

log = structlog.get_logger("modeld.actor")

T = TypeVar("T")
# Seconds between published IN-PROGRESS snapshots of a download: the one place progress is
# throttled (the pump reports positions, the WebSocket sends what is published). RESET,
# retries and terminal statuses are published at once and reach every subscriber.
PROGRESS_INTERVAL = 0.1
KEPT_VALUES = 16  # values kept for slow subscribers (a few RESETs and terminals at most)


class Broadcaster(Generic[T]):
    def __init__(self, initial: T, *, keep: Callable[[T], bool] = lambda value: False) -> None:
        self._value = initial
        self._version = 0
        self._changed = trio.Event()
        self._keep = keep
        self._kept: deque[tuple[int, T]] = deque(maxlen=KEPT_VALUES)

    @property
    def value(self) -> T:
        return self._value

    def publish(self, value: T) -> None:
        """Replace the current value and wake every subscriber. Never blocks."""
        self._value = value
        self._version += 1
        if self._keep(value):
            self._kept.append((self._version, value))
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def subscribe(self) -> AsyncIterator[T]:
        """Yield the current value at once, then each newer value (latest wins, but a kept
        value that was published since the last one yielded is never skipped), forever."""
        seen = -1
        while True:
            if self._version == seen:
                await self._changed.wait()
                continue
            missed = next(
                ((v, value) for v, value in self._kept if seen >= 0 and seen < v < self._version),
                None,
            )
            if missed is not None:
                seen = missed[0]
                yield missed[1]
            else:
                seen = self._version
                yield self._value


def must_deliver(progress: Progress) -> bool:
    """RESET and terminal statuses reach every subscriber, however slow."""
    return progress.terminal or progress.status == "RESET"


def progress_broadcaster(model_id: str) -> Broadcaster[Progress]:
    return Broadcaster(Progress(model=model_id), keep=must_deliver)


class ProgressMeter:
    """Turns a downloader's callbacks (actors.download.ProgressSink) into throttled
    IN-PROGRESS snapshots with a rate and an ETA; percentages never go backwards within the
    attempt, except after a RESET. Never blocks."""

    def __init__(self, model_id: str, broadcaster: Broadcaster[Progress], *,
                 retries: int = 0) -> None:
        self._model = model_id
        self._out = broadcaster
        self._retries = retries
        self._last_publish = -math.inf
        self._rate: float | None = None
        self._rate_at = trio.current_time()
        self._rate_bytes: int | None = None
        self._floor = 0.0
        self._done = 0

    def update(self, done: int, total: int | None, *, connections: int | None = None) -> None:
        self._done = done
        now = trio.current_time()
        if self._rate_bytes is None:
            self._rate_bytes, self._rate_at = done, now
        elif now - self._rate_at >= 0.25:
            inst = (done - self._rate_bytes) / (now - self._rate_at)
            self._rate = inst if self._rate is None else 0.7 * self._rate + 0.3 * inst
            self._rate_bytes, self._rate_at = done, now
        if now - self._last_publish < PROGRESS_INTERVAL:
            return
        self._last_publish = now
        pct = 0.0
        if total:
            pct = min(99.9, round(100.0 * done / total, 1))
        pct = max(pct, self._floor)
        self._floor = pct
        eta = None
        if total and self._rate:
            eta = round(max(0.0, (total - done) / self._rate), 1)
        self._out.publish(
            Progress(
                model=self._model,
                status="IN-PROGRESS",
                percentage=pct,
                bytes=done,
                total=total,
                bytes_per_second=None if self._rate is None else round(self._rate, 1),
                eta_seconds=eta,
                connections=connections,
            )
        )

    def reset(self, reason: str) -> None:
        """The downloader starts over; `reason` (what happened) goes to the log."""
        self._floor = 0.0
        self._rate = None
        self._rate_bytes = None
        self._last_publish = -math.inf  # the next update after a RESET is never held back
        log.warning("download_reset", model=self._model, reason=reason)
        self._out.publish(Progress(model=self._model, status="RESET"))

    def retrying(self, attempt: int, delay: float, reason: str) -> None:
        """Shown to subscribers as it happens (the next snapshot with bytes clears it)."""
        now = self._out.value
        status = now.status if now.status in ("INITIALIZED", "IN-PROGRESS") else "IN-PROGRESS"
        of = f"/{self._retries}" if self._retries >= attempt else ""
        self._out.publish(attrs.evolve(now, status=status, eta_seconds=None,
                                       retrying=f"retrying ({attempt}{of}): {reason}"))
        log.warning(
            "download_retry",
            model=self._model,
            attempt=attempt,
            delay=round(delay, 3),
            reason=reason,
            bytes=self._done,
        )
