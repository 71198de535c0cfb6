"""What `modeld pull` prints to a pipe: the end of a failed download keeps how far it got."""

from __future__ import annotations

from supervisor.views import PlainPullView


def test_a_failed_download_ends_with_the_bytes_done_and_the_reason() -> None:
    lines: list[str] = []
    view = PlainPullView(lines.append)
    view.update({"model": "m", "status": "IN-PROGRESS", "percentage": 98.2,
                 "bytes": 245_900_000, "total": 250_500_000, "bytesPerSecond": 1e6,
                 "etaSeconds": 4})
    view.update({"model": "m", "status": "FAILED", "percentage": 0, "bytes": 0,
                 "error": "could not reach example.com: connection refused (7 tries)"})
    assert "m   98.2%  245.9 MB / 250.5 MB  failed: could not reach example.com: " \
        "connection refused (7 tries)" == lines[-1]


def test_retries_show_as_they_happen() -> None:
    lines: list[str] = []
    view = PlainPullView(lines.append)
    view.update({"model": "m", "status": "INITIALIZED", "percentage": 0, "bytes": 0})
    view.update({"model": "m", "status": "INITIALIZED", "percentage": 0, "bytes": 0,
                 "retrying": "retrying (1/6): name not resolved"})
    assert lines[-1].endswith("retrying (1/6): name not resolved")


def test_a_running_download_says_how_many_connections_move_it_and_a_waiting_one_its_place(
) -> None:
    lines: list[str] = []
    view = PlainPullView(lines.append)
    view.update({"model": "m", "status": "INITIALIZED", "percentage": 0, "bytes": 0,
                 "queuePosition": 2})
    assert lines[-1].endswith("queued (2 in line)")
    view.update({"model": "m", "status": "IN-PROGRESS", "percentage": 10.0, "bytes": 1_000_000,
                 "total": 10_000_000, "bytesPerSecond": 1e6, "etaSeconds": 9,
                 "connections": 8})
    assert lines[-1].endswith("1.0 MB/s  ETA 9s  8 connections"), lines[-1]
    view.update({"model": "m", "status": "IN-PROGRESS", "percentage": 20.0, "bytes": 2_000_000,
                 "total": 10_000_000, "bytesPerSecond": 1e6, "etaSeconds": 8,
                 "connections": 1})
    assert lines[-1].endswith("ETA 8s  1 connection"), lines[-1]
