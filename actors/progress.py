"""Latest-value broadcasting: one producer, any number of subscribers, no queues.

The producer never waits and memory does not grow with slow subscribers: each subscriber only
ever sees the newest value, skipping what it was too slow to read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class Broadcaster(Generic[T]):
    def __init__(self, initial: T) -> None:
        self._value = initial
        self._version = 0
        self._changed = trio.Event()

    @property
    def value(self) -> T:
        return self._value

    @property
    def version(self) -> int:
        return self._version

    def publish(self, value: T) -> None:
        """Replace the current value and wake every subscriber. Never blocks."""
        self._value = value
        self._version += 1
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def subscribe(self) -> AsyncIterator[T]:
        """Yield the current value at once, then each newer value (latest wins), forever."""
        seen = -1
        while True:
            if self._version != seen:
                seen = self._version
                yield self._value
            else:
                await self._changed.wait()
