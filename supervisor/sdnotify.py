"""The two systemd protocols modeld speaks to its service manager, without a library.

* Readiness and liveness (sd_notify(3)): a datagram such as ``READY=1``, ``WATCHDOG=1`` or
  ``STOPPING=1`` sent to the AF_UNIX socket named by ``$NOTIFY_SOCKET``.
* Socket activation (sd_listen_fds(3)): the manager binds 127.0.0.1:1000 (a privileged port) and
  hands the listening sockets over as descriptors 3, 4, ... with ``$LISTEN_FDS``/``$LISTEN_PID``.

Outside systemd every function here is a harmless no-op, so the daemon calls them unconditionally.
"""

from __future__ import annotations

import os
import socket

import trio

__all__ = ["listen_fds", "notify", "run_watchdog", "watchdog_interval"]

SD_LISTEN_FDS_START = 3
"""The first descriptor the service manager passes (sd-daemon.h)."""

_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify(message: str) -> bool:
    """Send ``message`` (``KEY=VALUE`` lines) to the service manager.

    Returns True when the datagram was handed to the socket, False when ``$NOTIFY_SOCKET`` is
    unset or unsupported, or the send failed (socket missing, nobody listening, queue full).
    Never raises ``OSError`` and never blocks, so it is safe to call from the trio loop.
    """
    target = os.environ.get("NOTIFY_SOCKET", "")
    address: bytes
    if target.startswith("@"):
        # Abstract namespace: the name on the wire starts with a NUL byte instead of '@'.
        address = b"\0" + os.fsencode(target[1:])
    elif target.startswith("/"):
        address = os.fsencode(target)
    else:
        # Unset, relative, or a transport we do not speak (e.g. "vsock:...").
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # A full receive queue must cost a lost ping, not a stalled event loop.
            sock.setblocking(False)
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds that the manager expects this process to honour.

    Read from ``$WATCHDOG_USEC`` (microseconds). None when no watchdog is configured, the value
    is not a positive integer, or ``$WATCHDOG_PID`` is set to a process other than this one (the
    variables were inherited from a parent that is the one being watched).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if usec is None:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    try:
        timeout = int(usec)
        if pid is not None and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    if timeout <= 0:
        return None
    return timeout / 1_000_000


async def run_watchdog() -> None:
    """Send ``WATCHDOG=1`` now and then every half watchdog interval, until cancelled.

    Returns at once when no watchdog is configured. This is a trio task rather than a thread on
    purpose: if the event loop stalls, the pings stop and the manager restarts the daemon.
    """
    timeout = watchdog_interval()
    if timeout is None:
        return
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(timeout / 2)


def listen_fds() -> list[int]:
    """The listening sockets passed by the service manager, as file descriptor numbers.

    Follows sd_listen_fds(3): descriptors ``3 .. 3 + $LISTEN_FDS - 1``, only when ``$LISTEN_PID``
    is this process (otherwise they were meant for an ancestor). Returns [] when the variables are
    absent, malformed or name another process. The descriptors are marked close-on-exec, and
    ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` are removed from the environment in every
    case, so worker processes neither inherit the sockets nor believe they were activated.

    Raises ``OSError`` if a descriptor the environment announces is not open.
    """
    try:
        pid = os.environ.get("LISTEN_PID")
        count = os.environ.get("LISTEN_FDS")
        if pid is None or count is None:
            return []
        try:
            if int(pid) != os.getpid():
                return []
            n = int(count)
        except ValueError:
            return []
        fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(n, 0)))
        for fd in fds:
            os.set_inheritable(fd, False)
        return fds
    finally:
        for name in _LISTEN_VARIABLES:
            os.environ.pop(name, None)
