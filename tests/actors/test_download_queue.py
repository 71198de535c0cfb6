"""actors/download_queue.py: at most `max_active` at once, the rest in order, told their place;
a cancel while waiting leaves the line at once."""

from __future__ import annotations

import trio
import trio.lowlevel
import trio.testing

from actors.download_queue import DownloadQueue


async def test_the_line(autojump_clock: trio.testing.MockClock) -> None:
    queue = DownloadQueue(2)
    places: dict[str, list[int]] = {}
    began: list[str] = []
    release = {name: trio.Event() for name in "abcde"}
    scopes = {name: trio.CancelScope() for name in "abcde"}

    async def download(name: str) -> None:
        with scopes[name]:
            async with queue.slot(lambda place: places.setdefault(name, []).append(place)):
                began.append(name)
                await release[name].wait()

    async with trio.open_nursery() as nursery:
        for name in "abcde":
            nursery.start_soon(download, name)
            await trio.sleep(1)  # asked for in this order
        assert (["a", "b"], 2, 3) == (began, queue.active, queue.waiting)
        assert {"c": [1], "d": [2], "e": [3]} == places
        scopes["d"].cancel()  # waiting: leaves at once, e moves up
        await trio.sleep(1)
        assert ({"c": [1], "d": [2], "e": [3, 2]}, 2) == (places, queue.waiting)
        release["a"].set()
        await trio.sleep(1)
        assert (["a", "b", "c"], [3, 2, 1]) == (began, places["e"])
        for name in "bce":
            release[name].set()
    assert (["a", "b", "c", "e"], 0, 0) == (began, queue.active, queue.waiting)


async def test_a_slot_handed_over_as_the_waiter_is_cancelled_is_passed_on(
        autojump_clock: trio.testing.MockClock) -> None:
    queue = DownloadQueue(1)
    release, began = trio.Event(), []
    scope = trio.CancelScope()

    async def first() -> None:
        async with queue.slot(lambda place: None):
            await release.wait()
            scope.cancel()  # in the same step as the slot is handed to `second`

    async def second() -> None:
        with scope:
            async with queue.slot(lambda place: None):
                await trio.lowlevel.checkpoint()
                began.append("second")

    async def third() -> None:
        async with queue.slot(lambda place: None):
            began.append("third")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.sleep(1)
        nursery.start_soon(second)
        await trio.sleep(1)
        nursery.start_soon(third)
        await trio.sleep(1)
        release.set()
    assert (["third"], 0) == (began, queue.active)
