"""The model state machine: pure data, no trio.

A model is in exactly one `State`. The wire booleans (downloaded, downloading, loaded) are a
function of it (`flags`), so they can never contradict each other. Transient sub-states
(loading, unloading) map onto the stable state whose booleans are still true.
"""

from __future__ import annotations

import enum

import attrs


class State(enum.Enum):
    ABSENT = "absent"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"


class Event(enum.Enum):
    DOWNLOAD_START = "download_start"
    DOWNLOAD_DONE = "download_done"
    DOWNLOAD_FAILED = "download_failed"
    DOWNLOAD_CANCELLED = "download_cancelled"
    FILE_IMPORTED = "file_imported"
    LOAD_START = "load_start"
    LOAD_DONE = "load_done"
    LOAD_FAILED = "load_failed"
    UNLOAD_START = "unload_start"
    UNLOAD_DONE = "unload_done"
    WORKER_DIED = "worker_died"
    DELETE = "delete"


class TransitionRefused(Exception):
    """`event` is not allowed in `state`."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"{event.value} is not allowed while the model is {state.value}")
        self.state = state
        self.event = event


TABLE: dict[State, dict[Event, State]] = {
    State.ABSENT: {
        Event.DOWNLOAD_START: State.DOWNLOADING,
        Event.FILE_IMPORTED: State.DOWNLOADED,
        Event.DELETE: State.ABSENT,
    },
    State.DOWNLOADING: {
        Event.DOWNLOAD_DONE: State.DOWNLOADED,
        Event.DOWNLOAD_FAILED: State.ABSENT,
        Event.DOWNLOAD_CANCELLED: State.ABSENT,
    },
    State.DOWNLOADED: {
        Event.LOAD_START: State.LOADING,
        Event.FILE_IMPORTED: State.DOWNLOADED,
        Event.DELETE: State.ABSENT,
    },
    State.LOADING: {
        Event.LOAD_DONE: State.LOADED,
        Event.LOAD_FAILED: State.DOWNLOADED,
        Event.WORKER_DIED: State.DOWNLOADED,
    },
    State.LOADED: {
        Event.UNLOAD_START: State.UNLOADING,
        Event.WORKER_DIED: State.DOWNLOADED,
    },
    State.UNLOADING: {
        Event.UNLOAD_DONE: State.DOWNLOADED,
        Event.WORKER_DIED: State.DOWNLOADED,
    },
}


def transition(state: State, event: Event) -> State:
    """Return the state after `event`; raise `TransitionRefused` when the table has no entry."""
    try:
        return TABLE[state][event]
    except KeyError:
        raise TransitionRefused(state, event) from None


@attrs.frozen
class Flags:
    downloaded: bool
    downloading: bool
    loaded: bool


_FLAGS: dict[State, Flags] = {
    State.ABSENT: Flags(downloaded=False, downloading=False, loaded=False),
    State.DOWNLOADING: Flags(downloaded=False, downloading=True, loaded=False),
    State.DOWNLOADED: Flags(downloaded=True, downloading=False, loaded=False),
    State.LOADING: Flags(downloaded=True, downloading=False, loaded=False),
    State.LOADED: Flags(downloaded=True, downloading=False, loaded=True),
    State.UNLOADING: Flags(downloaded=True, downloading=False, loaded=True),
}


def flags(state: State) -> Flags:
    """The three wire booleans (downloaded, downloading, loaded) for `state`."""
    return _FLAGS[state]
