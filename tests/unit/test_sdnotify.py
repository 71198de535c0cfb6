import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from supervisor import sdnotify

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_VARIABLES = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)


@pytest.fixture(autouse=True)
def outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test run itself may be a systemd service; its variables must not leak in.
    for name in SYSTEMD_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def drain(sock: socket.socket) -> list[bytes]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096))
        except BlockingIOError:
            return messages


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A stand-in for the service manager: a datagram socket named by NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fsencode(path))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


# notify


def test_notify_without_notify_socket_is_a_noop() -> None:
    assert sdnotify.notify("READY=1") is False


def test_notify_reaches_a_filesystem_socket(manager: socket.socket) -> None:
    assert sdnotify.notify("READY=1") is True
    assert sdnotify.notify("STATUS=serving\nWATCHDOG=1") is True
    assert [b"READY=1", b"STATUS=serving\nWATCHDOG=1"] == drain(manager)


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"modeld-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("STOPPING=1") is True
        assert [b"STOPPING=1"] == drain(sock)


def test_notify_to_a_missing_socket_returns_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent"))
    assert sdnotify.notify("READY=1") is False


def test_notify_to_a_socket_nobody_reads_returns_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stale"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fsencode(path))
    # The socket file outlives its socket: sending is refused.
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert sdnotify.notify("READY=1") is False


def test_notify_to_an_abstract_name_nobody_bound_returns_false(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", f"@modeld-test-{uuid.uuid4().hex}")
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize("value", ["", "relative/notify", "vsock:2:1234"])
def test_notify_ignores_addresses_it_does_not_speak(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


# watchdog_interval


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 30.0),
        ("500000", None, 0.5),
        ("30000000", "self", 30.0),
        ("30000000", "other", None),
        ("30000000", "not-a-pid", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("", None, None),
    ],
)
def test_watchdog_interval(
    usec: str | None, pid: str | None, expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    assert expected == sdnotify.watchdog_interval()


# run_watchdog


async def test_watchdog_pings_every_half_interval(
    autojump_clock: trio.abc.Clock, manager: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    with trio.move_on_after(22):
        await sdnotify.run_watchdog()
    # One ping at once, then at 5, 10, 15 and 20 seconds.
    assert [b"WATCHDOG=1"] * 5 == drain(manager)


async def test_watchdog_stops_pinging_when_cancelled(
    autojump_clock: trio.abc.Clock, manager: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sdnotify.run_watchdog)
        await trio.sleep(3.5)
        nursery.cancel_scope.cancel()
    await trio.sleep(10)
    assert [b"WATCHDOG=1"] * 4 == drain(manager)


async def test_watchdog_without_configuration_returns_at_once(
    autojump_clock: trio.abc.Clock, manager: socket.socket
) -> None:
    start = trio.current_time()
    await sdnotify.run_watchdog()
    assert start == trio.current_time()
    assert [] == drain(manager)


async def test_watchdog_for_another_process_is_disabled(
    autojump_clock: trio.abc.Clock, manager: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    start = trio.current_time()
    await sdnotify.run_watchdog()
    assert start == trio.current_time()
    assert [] == drain(manager)


# listen_fds


def test_listen_fds_without_activation() -> None:
    assert [] == sdnotify.listen_fds()


@pytest.mark.parametrize(
    ("pid", "fds"),
    [
        ("other", "1"),
        ("self", "0"),
        ("self", "-1"),
        ("self", "many"),
        ("nobody", "1"),
        ("self", None),
        (None, "1"),
    ],
)
def test_listen_fds_not_for_us_is_empty_and_unset(
    pid: str | None, fds: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}
    if pid is not None:
        monkeypatch.setenv("LISTEN_PID", values.get(pid, pid))
    if fds is not None:
        monkeypatch.setenv("LISTEN_FDS", fds)
    monkeypatch.setenv("LISTEN_FDNAMES", "modeld.socket")
    assert [] == sdnotify.listen_fds()
    assert [] == [name for name in SYSTEMD_VARIABLES if name in os.environ]


# Passing descriptors 3, 4, ... needs a process of its own: in the test process they belong to
# pytest and trio.
CHILD = """
import json, os, socket, sys
from supervisor.sdnotify import listen_fds

def inheritable(fd):
    try:
        return os.get_inheritable(fd)
    except OSError:
        return None

before = {fd: inheritable(fd) for fd in (3, 4)}
try:
    fds = listen_fds()
    error = None
except OSError as exc:
    fds, error = None, exc.errno
print(json.dumps({
    "fds": fds,
    "error": error,
    "inheritable_before": [before[fd] for fd in fds or []],
    "inheritable_after": [os.get_inheritable(fd) for fd in fds or []],
    "listening": [
        socket.socket(fileno=os.dup(fd)).getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        for fd in fds or []
    ],
    "environment": sorted(name for name in os.environ if name.startswith("LISTEN_")),
}))
"""

SELF_ACTIVATE = """
import fcntl, os, socket
parked = []
for _ in range(2):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    parked.append(fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD, 100))
    sock.close()
for fd, high in enumerate(parked, start=3):
    os.dup2(high, fd)  # inheritable, as the service manager passes them
    os.close(high)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="a:b")
"""

MISSING_FD = """
import os
try:
    os.close(3)
except OSError:
    pass
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
"""


def child_environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in SYSTEMD_VARIABLES}
    env["PYTHONPATH"] = str(REPO)
    return env


def run_child(argv: list[str]) -> dict[str, object]:
    result = subprocess.run(
        argv, cwd=REPO, env=child_environment(), capture_output=True, text=True, timeout=30
    )
    assert 0 == result.returncode, result.stderr
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


def test_listen_fds_takes_passed_sockets() -> None:
    report = run_child([sys.executable, "-c", SELF_ACTIVATE + CHILD])
    assert {
        "fds": [3, 4],
        "error": None,
        "inheritable_before": [True, True],
        "inheritable_after": [False, False],
        "listening": [1, 1],
        "environment": [],
    } == report


def test_listen_fds_raises_on_an_announced_descriptor_that_is_not_open() -> None:
    report = run_child([sys.executable, "-c", MISSING_FD + CHILD])
    assert 9 == report["error"]  # EBADF
    assert [] == report["environment"]


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (Debian package: systemd)",
)
def test_listen_fds_under_systemd_socket_activate(tmp_path: Path) -> None:
    address = tmp_path / "modeld.sock"
    argv = ["systemd-socket-activate", "--listen", str(address), "-E", "PYTHONPATH"]
    with subprocess.Popen(
        [*argv, sys.executable, "-c", CHILD],
        cwd=REPO,
        env=child_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stderr is not None
        # "Listening on ... as 3." comes after listen(); the first connection starts the child.
        assert "Listening on" in process.stderr.readline()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(30)
            client.connect(os.fsencode(address))
            stdout, stderr = process.communicate(timeout=30)
    assert 0 == process.returncode, stderr
    assert {
        "fds": [3],
        "error": None,
        "inheritable_before": [True],
        "inheritable_after": [False],
        "listening": [1],
        "environment": [],
    } == json.loads(stdout)
