"""What the command line shows: sizes and durations, `ls` rows, and the views of a pull that
is followed (plain lines for pipes, JSON lines, a live bar at a terminal)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from typing import Literal

from supervisor.client import TERMINAL, Json
from supervisor.units import format_bytes


def format_duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    seconds = max(0, round(seconds))
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    if hours:
        return f"{hours}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def print_table(line: Callable[[str], None], tty: bool, header: tuple[str, ...],
                rows: list[tuple[str, ...]]) -> None:
    """Columns: drawn by rich at a terminal, padded plain text otherwise."""
    if tty:
        from rich.console import Console
        from rich.table import Table

        table = Table(*header, box=None, header_style="bold", pad_edge=False)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        line("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def model_row(model: Json) -> tuple[str, str, str, str, str]:
    """(id, name, state, size, loaded) as `modeld ls` shows them."""
    size = model.get("bytes")
    readable = size.get("readable") if isinstance(size, dict) else None
    state = str(model.get("state") or ("downloaded" if model.get("downloaded") else "absent"))
    progress = model.get("progress")
    if model.get("error"):
        state += " (error)"
    elif isinstance(progress, dict) and isinstance(progress.get("percentage"), int | float):
        state += f" {progress['percentage']:.1f}%"
    elif state == "absent" and model.get("partialBytes"):
        state += f" ({format_bytes(model['partialBytes'])} partial)"
    return (
        str(model.get("id", "")),
        str(model.get("name", "")),
        state,
        str(readable or "-"),
        "yes" if model.get("loaded") else "no",
    )


def progress_line(progress: Json) -> str:
    """One plain line: `id  42.0%  1.2 MB / 2.9 MB  1.0 MB/s  ETA 2s`."""
    status = progress.get("status", "UNKNOWN")
    parts = [
        str(progress.get("model", "")),
        f"{float(progress.get('percentage') or 0):5.1f}%",
        f"{format_bytes(progress.get('bytes'))} / {format_bytes(progress.get('total'))}",
    ]
    if status in ("FAILED", "CANCELED"):
        why = progress.get("error")
        parts.append(status.lower() + (f": {why}" if why else ""))
    elif progress.get("queuePosition"):
        parts.append(f"queued ({progress['queuePosition']} in line)")
    elif progress.get("retrying"):
        parts.append(str(progress["retrying"]))
    elif status == "IN-PROGRESS":
        rate = progress.get("bytesPerSecond")
        parts.append(f"{format_bytes(rate)}/s" if rate else "-/s")
        parts.append(f"ETA {format_duration(progress.get('etaSeconds'))}")
        if progress.get("connections"):
            n = int(progress["connections"])
            parts.append(f"{n} connection{'s' if n != 1 else ''}")
    else:
        parts.append(status.lower())
    return "  ".join(parts)


class PlainPullView:
    """Progress lines for logs and pipes: the first, one per 10 % step or 5 s, the last."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write
        self._step = -1
        self._at = -math.inf
        self._paused = False
        self._last: Json = {}

    def update(self, progress: Json) -> None:
        if self._paused:
            return
        if progress.get("bytes"):
            self._last = progress
        elif progress.get("status") in ("FAILED", "CANCELED"):
            # The end carries no byte counts: show how far it got, from the last snapshot.
            progress = {**progress, **{k: self._last.get(k)
                                       for k in ("bytes", "total", "percentage")}}
        step = int(float(progress.get("percentage") or 0) // 10)
        now = time.monotonic()
        terminal = progress.get("status") in TERMINAL
        if terminal or progress.get("retrying") or step != self._step or now - self._at >= 5:
            self._step, self._at = step, now
            self._write(progress_line(progress))

    def pause(self) -> None:
        self._paused = True

    def close(self) -> None:
        pass


class JsonPullView:
    """Each progress message as one JSON line, as the daemon sent it."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write

    def update(self, progress: Json) -> None:
        self._write(json.dumps(progress, separators=(",", ":")))

    def pause(self) -> None:
        pass

    def close(self) -> None:
        pass


class RichPullView:
    """A live bar with size, speed and ETA (the daemon's own figures) for a terminal."""

    def __init__(self, model_id: str) -> None:
        from rich.progress import BarColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[pct]:>5.1f}%"),
            TextColumn("[progress.download]{task.fields[size]}"),
            TextColumn("[progress.data.speed]{task.fields[rate]}"),
            TextColumn("[progress.remaining]{task.fields[eta]}"),
            TextColumn("{task.fields[status]}"),
        )
        self._task = self._progress.add_task(
            model_id, total=None, pct=0.0, size="", rate="", eta="", status=""
        )
        self._state: Literal["new", "running", "closed"] = "new"

    def update(self, progress: Json) -> None:
        if self._state == "closed":
            return
        if self._state == "new":  # drawn from the first message on, never before an error
            self._progress.start()
            self._state = "running"
        status = str(progress.get("status", ""))
        rate = progress.get("bytesPerSecond")
        eta = progress.get("etaSeconds")
        self._progress.update(
            self._task,
            completed=int(progress.get("bytes") or 0),
            total=progress.get("total"),
            pct=float(progress.get("percentage") or 0),
            size=f"{format_bytes(progress.get('bytes'))} / {format_bytes(progress.get('total'))}",
            rate=f"{format_bytes(rate)}/s" if rate else "",
            eta=f"ETA {format_duration(eta)}" if eta is not None else "",
            status=str(progress.get("retrying") or
                       ("" if status == "IN-PROGRESS" else status.lower())),
        )

    def pause(self) -> None:
        self.close()

    def close(self) -> None:
        if self._state == "running":
            self._progress.stop()
        self._state = "closed"


def ask_on_terminal(model_id: str) -> Callable[[], bool]:
    """A yes/no question on stderr, answered on stdin; runs in a worker thread."""

    def ask() -> bool:
        sys.stderr.write(
            f"\nCancel the download of {model_id} in modeld? "
            "[y/N] (N: it goes on without this command) "
        )
        sys.stderr.flush()
        answer = sys.stdin.readline()
        return answer.strip().lower() in ("y", "yes")

    return ask
