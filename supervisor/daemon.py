"""run_daemon(): THE root nursery, signals, systemd notifications and the shutdown order.

Shutdown: on SIGTERM/SIGINT hypercorn stops accepting and drains HTTP first; then the root
scope is cancelled and every actor stops (workers terminated and reaped, partials kept).
"""

from __future__ import annotations

import errno
import logging
import os
import signal

import hypercorn.config
import hypercorn.trio
import structlog
import trio

from supervisor import sdnotify
from supervisor.api.app import create_app, read_token
from supervisor.config import Config
from supervisor.registry import serve_registry

log = structlog.get_logger("modeld.daemon")


class StartupError(Exception):
    """The daemon cannot start; the message says what to do."""


def hypercorn_config(config: Config) -> hypercorn.config.Config:
    hc = hypercorn.config.Config()
    fds = sdnotify.listen_fds()
    if fds:
        hc.bind = [f"fd://{fd}" for fd in fds]
    else:
        host = config.server.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        hc.bind = [f"{host}:{config.server.port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = 3.0
    hc.keep_alive_timeout = 30.0
    hc.include_server_header = False
    return hc


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stop_requested", signal=signal.Signals(signum).name)
            sdnotify.notify("STOPPING=1")
            stop.set()


async def run_daemon(config: Config) -> None:
    """Serve until SIGTERM/SIGINT. Raises StartupError when it cannot start."""
    try:
        await _serve(config)
    except BaseExceptionGroup as group:
        startup = group.subgroup(StartupError)
        if startup is None or startup.exceptions != group.exceptions:
            raise
        raise StartupError(str(_first_leaf(startup))) from group


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _serve(config: Config) -> None:
    try:
        token = read_token(config.server.token_file)
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot read the token file: {exc}") from None
    stop = trio.Event()
    hc = hypercorn_config(config)
    async with trio.open_nursery() as root:
        root.start_soon(_watch_signals, stop)
        registry = await root.start(serve_registry, config)
        app = create_app(registry, config, token=token)
        async with trio.open_nursery() as http:
            try:
                binds = await http.start(
                    lambda task_status: hypercorn.trio.serve(
                        app, hc, shutdown_trigger=stop.wait, task_status=task_status
                    )
                )
            except OSError as exc:
                root.cancel_scope.cancel()
                raise _listen_error(config, exc) from None
            log.info("listening", urls=binds, pid=os.getpid())
            sdnotify.notify("READY=1")
            root.start_soon(sdnotify.run_watchdog)
        log.info("http_stopped")
        root.cancel_scope.cancel()
    log.info("stopped")


def _listen_error(config: Config, exc: OSError) -> StartupError:
    where = f"{config.server.host}:{config.server.port}"
    if exc.errno == errno.EACCES:
        return StartupError(
            f"permission denied binding {where}: ports below 1024 need socket activation "
            "(systemctl enable --now modeld.socket) or CAP_NET_BIND_SERVICE; "
            "or set [server] port to 1024 or higher"
        )
    if exc.errno == errno.EADDRINUSE:
        return StartupError(f"{where} is already in use: is another modeld running?")
    return StartupError(f"cannot listen on {where}: {exc.strerror or exc}")
