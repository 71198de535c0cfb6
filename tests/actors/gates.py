"""Load gates for actors tested on their own."""

from __future__ import annotations

import trio


class OpenGate:
    """A gate that admits everything: for a single actor on its own (tests)."""

    async def admit(self, model_id: str, need: int) -> None:
        await trio.lowlevel.checkpoint()

    def release(self, model_id: str) -> None:
        pass

    def touch(self, model_id: str) -> None:
        pass

    def idle(self, model_id: str) -> None:
        pass
