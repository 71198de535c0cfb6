"""How many downloads run at once (`[download] max_active`): the rest wait in the order they
were asked for, each told its place in the queue as it changes. A model's actor runs its
download inside `DownloadQueue.slot`, and within its own cancel scope: a cancel of a waiting
download leaves the queue at once, and the places behind it move up."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import attrs
import trio

Place = Callable[[int], None]  # told the 1-based place in the queue whenever it changes


@attrs.define(eq=False)
class _Waiter:
    tell: Place
    ready: trio.Event = attrs.Factory(trio.Event)
    place: int = 0


class DownloadQueue:
    def __init__(self, max_active: int) -> None:
        self.max_active = max_active
        self.active = 0
        self._waiting: list[_Waiter] = []

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def slot(self, tell: Place) -> AsyncIterator[None]:
        """Hold one of `max_active` slots for the body; until one is free, wait in line, told
        the place (`tell(1)`: next). Cancellation while waiting leaves the line."""
        if self.active < self.max_active and not self._waiting:
            self.active += 1
        else:
            waiter = _Waiter(tell)
            self._waiting.append(waiter)
            self._tell_places()
            try:
                await waiter.ready.wait()
            except BaseException:
                if waiter.ready.is_set():  # handed a slot just as it was cancelled
                    self._release()
                else:
                    self._waiting.remove(waiter)
                    self._tell_places()
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        """A slot is free: hand it to the first in line (it stays counted), else count it off."""
        if self._waiting:
            self._waiting.pop(0).ready.set()
            self._tell_places()
        else:
            self.active -= 1

    def _tell_places(self) -> None:
        for place, waiter in enumerate(self._waiting, start=1):
            if waiter.place != place:
                waiter.place = place
                waiter.tell(place)
