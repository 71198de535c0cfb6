"""Start-up through a real daemon: a stop signal stops it during start-up too (a broken stored
model never holding start-up is tested on the registry, tests/actors/test_supervision.py)."""

from __future__ import annotations

import signal
import time

from actors.spec import ModelSpec
from actors.store import Store
from tests.e2e.conftest import DaemonFactory

MANY = 3000  # custom models: enough that starting them takes a while on any machine


def test_sigterm_during_startup_stops_the_daemon(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()
    store = Store.open(daemon.storage)
    for n in range(MANY):
        store.write_record(ModelSpec(id=f"m{n}", name=f"M{n}",
                                     url=f"http://127.0.0.1:9/m{n}.gguf", custom=True))
    daemon.launch()
    daemon.wait_for("registry_starting", timeout=60)
    assert daemon.proc is not None
    began = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert 0 == daemon.proc.wait(timeout=30)
    took = time.monotonic() - began
    assert not daemon.events("registry_started"), "start-up ended before the signal came"
    assert not daemon.events("listening")
    assert took < 10, took
    assert [{"during": "startup"}] == [
        {"during": e.get("during")} for e in daemon.events("stopped")]
    daemon.proc = None
