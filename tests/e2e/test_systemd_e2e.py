"""modeld as a systemd service, without systemd as PID 1: the notify protocol read from our own
datagram socket, socket activation by `systemd-socket-activate`, start-up errors an operator
can act on, and a graceful stop while a download runs and a model is loaded."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.daemon import ROOT
from tests.e2e.conftest import DaemonFactory
from tests.gguf_factory import gguf_of_size, write_tiny_llama
from tests.origin import run_origin_in_thread

SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID",
                     "LISTEN_FDS", "LISTEN_FDNAMES", "STATE_DIRECTORY")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Manager:
    """The service manager's end of sd_notify: a datagram socket that records what arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(os.fsencode(path))
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, str]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        # Called on the reader thread the moment a message arrives.
        self.on_message: list[object] = []

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            for line in data.decode().splitlines():
                self.received.append((at, line))
                for hook in list(self.on_message):
                    hook(line)  # type: ignore[operator]

    def times(self, message: str) -> list[float]:
        return [at for at, line in self.received if line == message]

    def wait_for(self, message: str, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if seen := self.times(message):
                return seen[0]
            time.sleep(0.01)
        raise TimeoutError(f"no {message} within {timeout} s: {self.received}")

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    manager = Manager(tmp_path / "notify.sock")
    yield manager
    manager.close()


def test_ready_watchdog_and_stopping(make_daemon: DaemonFactory, manager: Manager) -> None:
    port = free_port()
    daemon = make_daemon(server={"port": port})
    url = f"http://127.0.0.1:{port}"
    right_after_ready: list[int] = []

    def on_message(line: str) -> None:
        if line == "READY=1":  # ask at once, on the thread that saw READY
            right_after_ready.append(httpx.get(f"{url}/models", timeout=5).status_code)

    manager.on_message.append(on_message)
    started = time.monotonic()
    daemon.start(env={"NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": "400000"})
    assert daemon.wait_for("listening")["socket_activated"] is False
    ready = manager.wait_for("READY=1")
    print(f"process start to READY=1: {ready - started:.3f} s")
    time.sleep(1.2)
    assert [200] == right_after_ready
    pings = [at for at in manager.times("WATCHDOG=1") if at >= ready]
    assert len(pings) >= 4, manager.received
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    # Every WATCHDOG_USEC / 2 = 0.2 s; a gap of 0.4 s would get the service restarted.
    assert 0.15 < statistics.median(gaps) < 0.3, gaps
    assert max(gaps) < 0.4, gaps

    assert 0 == daemon.stop()
    stopping = manager.wait_for("STOPPING=1", timeout=5)
    assert stopping > ready
    order = [line for _, line in manager.received if line != "WATCHDOG=1"]
    assert ["READY=1", "STOPPING=1"] == order


def test_watchdog_meant_for_another_process_is_left_alone(make_daemon: DaemonFactory,
                                                          manager: Manager) -> None:
    daemon = make_daemon().start(env={"NOTIFY_SOCKET": str(manager.path),
                                      "WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"})
    manager.wait_for("READY=1")
    time.sleep(0.6)
    assert [] == manager.times("WATCHDOG=1")
    assert 0 == daemon.stop()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed (Debian package: systemd)")
def test_socket_activation(make_daemon: DaemonFactory) -> None:
    port = free_port()
    # The config names another port: the daemon must serve the socket it is handed instead.
    daemon = make_daemon(server={"port": free_port()})
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E", "PYTHONUNBUFFERED=1",
         sys.executable, "-m", "supervisor", "serve", "--config", str(daemon.config_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES},
    )
    daemon.follow(proc)  # the helper reads its JSON lines and stops it with SIGTERM
    try:
        assert proc.stderr is not None
        assert b"Listening on" in proc.stderr.readline()
        # This first connection waits in the backlog until the daemon accepts it.
        r = httpx.get(f"http://127.0.0.1:{port}/models", timeout=30)
        assert (200, {"iterable": []}) == (r.status_code, r.json())
        listening = daemon.wait_for("listening")
        assert ([f"http://127.0.0.1:{port}"], proc.pid, True) == (
            listening["urls"], listening["pid"], listening["socket_activated"])
        assert 0 == daemon.stop()
    finally:
        daemon.close()


def test_a_port_in_use_says_what_to_do(make_daemon: DaemonFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = make_daemon(server={"port": port})
        proc = subprocess.run(
            [sys.executable, "-m", "supervisor", "serve", "--config", str(daemon.config_path)],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
    assert 1 == proc.returncode
    assert (f"modeld: 127.0.0.1:{port} is already in use: is another modeld running? "
            "(stop it, or pick another [server] port)\n") == proc.stderr


def unprivileged() -> list[str] | None:
    """A command prefix that runs as a user who may not bind ports below 1024."""
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start <= 1000:
        return None
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    # Still root (so the checkout and venv stay readable wherever they are), but without the
    # capability that lets root bind ports below 1024: the kernel answers EACCES for real.
    return [setpriv, "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service"]


def test_a_privileged_port_says_what_to_do() -> None:
    prefix = unprivileged()
    if prefix is None:
        pytest.skip("needs setpriv (as root) or a user that cannot bind port 1000")
    # Somewhere the unprivileged user can read the config and write its storage.
    where = Path(tempfile.mkdtemp(prefix="modeld-eacces-"))
    try:
        where.chmod(0o777)
        config = where / "config.toml"
        config.write_text(f'[server]\nport = 1000\n[storage]\ndir = "{where / "storage"}"\n')
        config.chmod(0o644)
        proc = subprocess.run(
            [*prefix, sys.executable, "-m", "supervisor", "serve", "--config", str(config)],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
            env={k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES},
        )
    finally:
        shutil.rmtree(where, ignore_errors=True)
    assert 1 == proc.returncode, proc.stderr
    assert proc.stderr.startswith("modeld: permission denied listening on 127.0.0.1:1000: "
                                  "ports below 1024 are privileged."), proc.stderr
    for what_to_do in ("systemctl enable --now modeld.socket", "CAP_NET_BIND_SERVICE",
                       "--port 8080"):
        assert what_to_do in proc.stderr
    assert "Traceback" not in proc.stderr
    assert '"event": "startup_failed"' in proc.stdout


def test_graceful_stop_under_load(make_daemon: DaemonFactory, tmp_path: Path) -> None:
    tiny = write_tiny_llama(tmp_path / "tiny.gguf")
    with run_origin_in_thread() as origin:
        origin.add("/big.gguf", gguf_of_size(8_000_000))
        origin.faults("/big.gguf").throttle = 100_000
        daemon = make_daemon([{"id": "big", "name": "Big", "url": origin.url("/big.gguf")}])
        daemon.start()
        base = daemon.url
        model_id = httpx.post(f"{base}/models/create", json={"name": "Tiny"}).json()["id"]
        r = httpx.put(f"{base}/model/{model_id}/file", content=tiny.read_bytes(),
                      headers={"content-type": "application/octet-stream"})
        assert 200 == r.status_code, r.text
        r = httpx.post(f"{base}/model/{model_id}/load", timeout=60)
        assert (200, True) == (r.status_code, r.json()["loaded"])
        worker = psutil.Process(daemon.wait_for("model_loaded", model=model_id)["pid"])
        assert 200 == httpx.post(f"{base}/model/big/download").status_code
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/model/big/download/progress").json()["bytes"] < 50_000:
            assert time.monotonic() < deadline
            time.sleep(0.05)

        started = time.monotonic()
        assert 0 == daemon.stop(timeout=10)
        took = time.monotonic() - started
    print(f"SIGTERM to exit under load: {took:.2f} s")
    assert took < 10
    partial = daemon.storage / "models" / "big.gguf.partial"
    assert partial.exists()
    assert partial.with_name("big.gguf.partial.json").exists()
    assert not (daemon.storage / "models" / "big.gguf").exists()
    with pytest.raises(psutil.NoSuchProcess):
        worker.status()
    assert ["stop_requested", "http_stopped", "stopped"] == [
        line["event"] for line in daemon.lines
        if line["event"] in ("stop_requested", "http_stopped", "stopped")]

    # The next start resumes the interrupted download by itself.
    daemon.start()
    assert daemon.wait_for("download_resume", model="big")["bytes"] > 0
    assert 0 == daemon.stop()

