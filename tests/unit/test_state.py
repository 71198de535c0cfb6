"""The transition table, every entry and every refusal."""

from __future__ import annotations

import itertools

import pytest

from actors.state import TABLE, Event, State, TransitionRefused, flags, transition

ALLOWED = {
    (State.ABSENT, Event.DOWNLOAD_START): State.DOWNLOADING,
    (State.ABSENT, Event.FILE_IMPORTED): State.DOWNLOADED,
    (State.ABSENT, Event.DELETE): State.ABSENT,
    (State.DOWNLOADING, Event.DOWNLOAD_DONE): State.DOWNLOADED,
    (State.DOWNLOADING, Event.DOWNLOAD_FAILED): State.ABSENT,
    (State.DOWNLOADING, Event.DOWNLOAD_CANCELLED): State.ABSENT,
    (State.DOWNLOADED, Event.LOAD_START): State.LOADING,
    (State.DOWNLOADED, Event.FILE_IMPORTED): State.DOWNLOADED,
    (State.DOWNLOADED, Event.DELETE): State.ABSENT,
    (State.LOADING, Event.LOAD_DONE): State.LOADED,
    (State.LOADING, Event.LOAD_FAILED): State.DOWNLOADED,
    (State.LOADING, Event.WORKER_DIED): State.DOWNLOADED,
    (State.LOADED, Event.UNLOAD_START): State.UNLOADING,
    (State.LOADED, Event.WORKER_DIED): State.DOWNLOADED,
    (State.UNLOADING, Event.UNLOAD_DONE): State.DOWNLOADED,
    (State.UNLOADING, Event.WORKER_DIED): State.DOWNLOADED,
}


@pytest.mark.parametrize(("state", "event"), list(itertools.product(State, Event)))
def test_every_pair(state: State, event: Event) -> None:
    expected = ALLOWED.get((state, event))
    if expected is None:
        with pytest.raises(TransitionRefused) as info:
            transition(state, event)
        assert info.value.state is state
        assert event.value in str(info.value)
    else:
        assert expected == transition(state, event)


def test_table_has_nothing_else() -> None:
    entries = {(s, e) for s, row in TABLE.items() for e in row}
    assert set(ALLOWED) == entries


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (State.ABSENT, (False, False, False)),
        (State.DOWNLOADING, (False, True, False)),
        (State.DOWNLOADED, (True, False, False)),
        (State.LOADING, (True, False, False)),
        (State.LOADED, (True, False, True)),
        (State.UNLOADING, (True, False, True)),
    ],
)
def test_flags_follow_the_contract(state: State, expected: tuple[bool, bool, bool]) -> None:
    f = flags(state)
    assert expected == (f.downloaded, f.downloading, f.loaded)
    assert not (f.downloading and f.downloaded)
    assert not (f.loaded and not f.downloaded)
