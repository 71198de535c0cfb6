"""A real modeld process for end-to-end tests: started on 127.0.0.1 port 0, its stdout read
as JSON lines, stopped with SIGTERM (and its exit code checked) or killed."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def toml_text(sections: dict[str, dict[str, Any]], models: list[dict[str, Any]]) -> str:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    for model in models:
        lines.append("[[models]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in model.items()]
    return "\n".join(lines) + "\n"


class Daemon:
    def __init__(self, tmp: Path, models: list[dict[str, Any]] | None = None,
                 **sections: dict[str, Any]) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.storage = tmp / "storage"
        self.config_path = tmp / "config.toml"
        merged: dict[str, dict[str, Any]] = {
            "server": {"host": "127.0.0.1", "port": 0},
            "storage": {"dir": str(self.storage)},
            "download": {"allow_http": True, "stall_timeout": 5.0, "retries": 3},
            "runtime": {"threads": 1, "load_timeout": 60.0},
        }
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        self.config_path.write_text(toml_text(merged, models or []))
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[dict[str, Any]] = []
        self.raw_lines: list[str] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.url = ""
        self.port = 0

    def start(self, timeout: float = 30.0, env: dict[str, str] | None = None,
              prefix: list[str] | None = None) -> Daemon:
        """Start the daemon (under `prefix`, e.g. a fault injector) and wait until it listens."""
        self.launch(env=env, prefix=prefix)
        event = self.wait_for("listening", timeout=timeout)
        self.url = event["urls"][0]
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def launch(self, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> None:
        """Start the daemon's process and return at once."""
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("STATE_DIRECTORY", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "supervisor", "serve", "--config",
             str(self.config_path)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env,
        )
        self.follow(self.proc)

    def follow(self, proc: subprocess.Popen[bytes]) -> None:
        """Take `proc` as the daemon's process and read its JSON lines from now on."""
        self.proc = proc
        # New ones: the reader of a killed process may still be draining its pipe, into its own.
        self.lines = []
        self._queue = queue.Queue()
        threading.Thread(target=self._read, args=(proc, self.lines, self._queue),
                         daemon=True).start()

    def _read(self, proc: subprocess.Popen[bytes], lines: list[dict[str, Any]],
              into: queue.Queue[dict[str, Any] | None]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            self.raw_lines.append(text)
            try:
                line = json.loads(text)
            except ValueError:
                line = {"event": "<not json>", "text": text}
            lines.append(line)
            into.put(line)
        into.put(None)

    def wait_for(self, event: str, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        """The first stdout line (from now on, or already seen) with this event and fields."""
        for line in list(self.lines):
            if line.get("event") == event and all(line.get(k) == v for k, v in match.items()):
                return line
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {event!r} log line within {timeout} s: {self.lines[-20:]}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                err = self.proc.stderr.read().decode() if self.proc and self.proc.stderr else ""
                raise RuntimeError(f"modeld exited before {event!r}: {self.lines[-20:]} {err}")
            if line.get("event") == event and all(line.get(k) == v for k, v in match.items()):
                return line

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None
