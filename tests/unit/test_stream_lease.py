"""A streamed /v1 response gives its generation and queue slot back on every path, also when
the server never starts its body (the client went away between the handler and the first
byte): before, that stream kept the model's worker and a queue slot forever."""

from __future__ import annotations

import trio
import trio.testing

from actors.generation import GenerationStream
from actors.worker import GenerationResult
from supervisor.api.openai import BODY_START_GRACE, _Lease


class Pieces:
    """A TextStream that would go on for ever until it is closed."""

    result: GenerationResult | None = None

    def __init__(self) -> None:
        self.closed = 0

    def __aiter__(self) -> Pieces:
        return self

    async def __anext__(self) -> str:
        await trio.lowlevel.checkpoint()
        return "x"

    async def aclose(self) -> None:
        self.closed += 1


def lease() -> tuple[_Lease, Pieces, list[str]]:
    inner = Pieces()
    released: list[str] = []
    return _Lease(GenerationStream("m", inner), lambda: released.append("m")), inner, released


async def test_a_body_that_never_starts_is_freed_after_the_grace(
        autojump_clock: trio.abc.Clock) -> None:
    held, inner, released = lease()
    await held.guard()
    assert BODY_START_GRACE == trio.current_time()
    assert (1, ["m"]) == (inner.closed, released)


async def test_a_started_body_is_freed_once_by_its_own_end(
        autojump_clock: trio.abc.Clock) -> None:
    held, inner, released = lease()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(held.guard)
        held.started.set()
        await trio.sleep(1)
        assert (0, []) == (inner.closed, released)  # the guard stood down
        with trio.CancelScope() as scope:
            scope.cancel()
            await held.close()  # shielded: a cancelled body still closes its stream
        await held.close()
    assert (1, ["m"]) == (inner.closed, released)
