"""Keep-alive: how long an idle loaded model stays loaded (Ollama's `keep_alive` semantics).

A duration is a number of seconds or a string such as "15m", "30s", "1h30m", "500ms"; 0
unloads the model as soon as it is idle; a negative one, or "forever", keeps it until it is
unloaded. `KeepAlive` is the actor's bookkeeping of one loaded model: how many requests use it
now, since when it is idle, when it expires; `watch_expiry` tells the actor when that time has
come. A model in use never expires: its clock starts when its last request ends.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

# Re-exported: the actors and the API know these names from here.
from actors.durations import FOREVER as FOREVER
from actors.durations import parse_keep_alive as parse_keep_alive
from actors.durations import show_keep_alive as show_keep_alive

# A model just loaded waits at least this long for its first request, whatever its keep-alive:
# a load on first use with keep_alive 0 must not be unloaded before the request that caused it.
FIRST_USE_GRACE = 30.0


class Default(enum.Enum):
    """The keep-alive a load on first use gets: the model's own, else [runtime] keep_alive."""

    DEFAULT = "default"


DEFAULT = Default.DEFAULT
KeepAliveArg = float | Default  # seconds (FOREVER included), or DEFAULT


@attrs.frozen
class Expired:
    """A model actor's own message: its keep-alive deadline has passed."""


@attrs.define
class KeepAlive:
    """One loaded model's use and expiry, in trio time. `epoch` tells the uses of one load
    from those of an earlier one (a request that outlived its worker ends harmlessly)."""

    duration: float = FOREVER
    busy: int = 0
    idle_since: float | None = None
    epoch: int = 0
    loaded: bool = False
    fresh: bool = False  # loaded, and no request has used it yet
    changed: trio.Event = attrs.field(factory=trio.Event)
    on_idle: Callable[[], None] = lambda: None  # called when the last request ends

    @property
    def deadline(self) -> float | None:
        """When the model expires if nothing uses it before; None: not while it is busy, not
        loaded, or kept forever."""
        if not self.loaded or self.busy or self.idle_since is None or math.isinf(self.duration):
            return None
        return self.idle_since + (max(self.duration, FIRST_USE_GRACE) if self.fresh
                                  else self.duration)

    def due(self, now: float) -> bool:
        deadline = self.deadline
        return deadline is not None and now >= deadline

    def start(self, duration: float, now: float) -> None:
        """The model is loaded now, idle, kept for `duration` seconds when idle."""
        self.epoch += 1
        self.loaded, self.busy, self.idle_since, self.duration = True, 0, now, duration
        self.fresh = True
        self._poke()

    def set_duration(self, duration: float) -> None:
        self.duration = duration
        self._poke()

    def begin_use(self, duration: KeepAliveArg) -> int:
        """A request starts using the model (with its own keep_alive, unless DEFAULT);
        returns the epoch to hand back to `end_use`."""
        self.busy += 1
        self.fresh = False
        if not isinstance(duration, Default):
            self.duration = duration
        self._poke()
        return self.epoch

    def lend(self, duration: KeepAliveArg) -> Callable[[], None]:
        """`begin_use`; the model is in use (never expired nor evicted) until the returned
        call (a stream's close, a job's end)."""
        epoch = self.begin_use(duration)
        return lambda: self.end_use(epoch, trio.current_time())

    def end_use(self, epoch: int, now: float) -> None:
        if epoch != self.epoch or not self.busy:
            return
        self.busy -= 1
        if not self.busy:
            self.idle_since = now
            self.on_idle()
        self._poke()

    def stop(self) -> None:
        """The model is unloaded (or its worker died)."""
        self.epoch += 1
        self.loaded, self.busy, self.idle_since = False, 0, None
        self._poke()

    def view_fields(self) -> dict[str, Any]:
        """ModelView's fields: busy, idle_since and expires_at (wall-clock epoch seconds),
        keep_alive (None: kept until unloaded)."""
        if not self.loaded:
            return {}
        try:
            to_wall = time.time() - trio.current_time()
        except RuntimeError:  # read outside trio (a test's snapshot): no clock to convert
            return {"busy": self.busy}
        deadline = self.deadline
        return {
            "busy": self.busy,
            "idle_since": None if self.busy or self.idle_since is None
            else self.idle_since + to_wall,
            "expires_at": None if deadline is None else deadline + to_wall,
            "keep_alive": show_keep_alive(self.duration),
        }

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


async def watch_expiry(keep: KeepAlive, expire: Callable[[], Awaitable[None]]) -> None:
    """Call `expire` whenever the model's deadline passes (the actor then checks `due` and
    unloads it); runs until cancelled."""
    while True:
        changed = keep.changed
        deadline = keep.deadline
        if deadline is None:
            await changed.wait()
            continue
        with trio.move_on_at(deadline):
            await changed.wait()
            continue
        await expire()
        await changed.wait()  # the actor unloads it (or a use came first): either pokes
