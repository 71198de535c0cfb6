"""The sha256 of a download, taken by its pump child (actors/pump_main.py) from the page cache:
the file's complete front is hashed while the rest still arrives, so that little is left to
hash when the last byte is in."""

from __future__ import annotations

from collections.abc import Callable

import trio

from actors.pump import PumpFailed, PumpProcess

HASH_STEP = 8 * 1024 * 1024  # bytes of new complete front gathered before one hash request


class FrontHash:
    """Follows a download's complete front with the pump's running sha256."""

    def __init__(self, pump: PumpProcess) -> None:
        self.pump = pump
        self.broken = False  # hashing along failed: `hexdigest` starts again from byte 0

    async def follow(self, front: Callable[[], int], written: Callable[[], trio.Event],
                     fetching: Callable[[], bool]) -> None:
        """Hash [0, front()) whenever a HASH_STEP more of it is in, while `fetching()`;
        `written()` is an event set at the next write (and when fetching ends). Never
        cancelled mid-request: a reply left behind would answer the next one. A failure only
        marks it broken."""
        try:
            while fetching():
                ready = front()
                if ready - self.pump.hashed >= HASH_STEP:
                    await self.pump.hash_upto(ready)
                else:
                    await written().wait()
        except (OSError, PumpFailed):
            self.broken = True

    async def hexdigest(self, size: int) -> str:
        """The sha256 of the file's first `size` bytes. Raises OSError, PumpFailed."""
        if self.broken:
            await self.pump.hash_reset()
        await self.pump.hash_upto(size)
        return await self.pump.hexdigest()
