"""run_daemon(): THE root nursery, signals, systemd notifications and the shutdown order.

Shutdown: on SIGTERM/SIGINT hypercorn stops accepting and drains HTTP first; then the root
scope is cancelled and every actor stops (workers terminated and reaped, partials kept).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import hypercorn.config
import hypercorn.trio
import structlog
import trio

from actors.memory import resident_bytes
from actors.store import Store, StoreError
from supervisor import sdnotify
from supervisor.address import clear_address, write_address
from supervisor.api.app import create_asgi, read_token
from supervisor.api.ops import Phase, Readiness
from supervisor.config import Config
from supervisor.http_limits import cap_connections, connection_limit
from supervisor.hub import load_access
from supervisor.logs import hide_secret, observe_events
from supervisor.metrics import Metrics
from supervisor.registry import Registry, serve_registry

log = structlog.get_logger("modeld.daemon")
E = TypeVar("E", bound=BaseException)


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
    # hypercorn's idle timer runs from the connection's start until a whole request head has
    # come, and between requests: it is the header timeout (bodies: supervisor/api/models.py).
    # Its own read_timeout would also cut streams whose client sends nothing (progress
    # WebSockets, server-sent events), so it stays off.
    hc.keep_alive_timeout = config.server.read_timeout
    hc.include_server_header = False
    return hc


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stop_requested", signal=signal.Signals(signum).name)
            sdnotify.notify("STOPPING=1")
            stop.set()


async def _open_store(config: Config) -> Store:
    path = config.storage.path()
    try:
        return await trio.to_thread.run_sync(Store.open, path)
    except (OSError, StoreError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StartupError(
            f"cannot use the storage dir {path}: {reason} (set [storage] dir or --storage-dir "
            "to a directory modeld's user may create and write)") from None


async def _stopping_when(event: trio.Event, readiness: Readiness) -> None:
    await event.wait()
    readiness.phase = Phase.STOPPING  # GET /health: 503 while HTTP drains


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def run_daemon(config: Config, announce: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; `announce(url)` once listening. Raises StartupError when it
    cannot start."""
    try:
        await _serve(config, announce)
    except BaseExceptionGroup as group:
        startup = _only(group, StartupError)
        if startup is None:
            raise
        raise StartupError(str(startup)) from group


def _only(exc: BaseException, kind: type[E]) -> E | None:
    """`exc` itself, or the first leaf of the group `exc` when every leaf is a `kind`."""
    if isinstance(exc, kind):
        return exc
    if not isinstance(exc, BaseExceptionGroup):
        return None
    match, rest = exc.split(kind)
    if match is None or rest is not None:
        return None
    first: BaseException = match
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first if isinstance(first, kind) else None


async def _record_address(storage: Path, binds: list[str]) -> None:
    try:
        await trio.to_thread.run_sync(write_address, storage, binds[0])
    except OSError as exc:  # the command line then needs --url; serving goes on
        log.warning("address_not_recorded", reason=str(exc))


async def _serve(config: Config, announce: Callable[[str], None] | None) -> None:
    try:
        token = read_token(config.server.token_file)
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot read the token file: {exc}") from None
    if token is not None:
        hide_secret(token)
    try:
        hub = load_access(config.hub.endpoint, config.hub.token_file)
    except (OSError, ValueError) as exc:  # the message names the file, never the token
        raise StartupError(f"cannot read the Hub token: {exc}") from None
    if hub.token is not None:
        hide_secret(hub.token)
    stop = trio.Event()
    hc = hypercorn_config(config)
    cap_connections(connection_limit(config.server.max_connections))
    readiness = Readiness(Phase.STARTING)  # its clock is the uptime in GET /status
    async with trio.open_nursery() as root:
        root.start_soon(_watch_signals, stop)
        root.start_soon(_stopping_when, stop, readiness)
        # A stop signal during start-up (thousands of models, a slow disk) stops it too.
        starting = trio.CancelScope()
        root.start_soon(_cancel_when, stop, starting)
        registry: Registry | None = None
        # Counting from the first event on: downloads resumed at start-up included.
        metrics = Metrics(lambda: registry.views() if registry else [], resident_bytes,
                          lambda model_id: registry is not None and registry.knows(model_id))
        observe_events(metrics.observe)
        with starting:
            store = await _open_store(config)
            registry = await root.start(
                lambda task_status: serve_registry(config, store=store, hub=hub,
                                                  task_status=task_status))
        if registry is None or stop.is_set():
            root.cancel_scope.cancel()
            log.info("stopped", during="startup")
            return
        app = create_asgi(registry, config, token=token, readiness=readiness, metrics=metrics)
        async with trio.open_nursery() as http:
            try:
                binds = await http.start(
                    lambda task_status: hypercorn.trio.serve(
                        app, hc, shutdown_trigger=stop.wait, task_status=task_status
                    )
                )
            except (OSError, BaseExceptionGroup) as exc:
                # hypercorn binds inside its own nurseries: the OSError comes wrapped.
                bind_error = _only(exc, OSError)
                if bind_error is None:
                    raise
                root.cancel_scope.cancel()
                raise _listen_error(config, bind_error) from None
            activated = any(bind.startswith("fd://") for bind in hc.bind)
            await _record_address(store.root, binds)  # before `listening`: then it is there
            if not stop.is_set():
                readiness.phase = Phase.SERVING
            log.info("listening", urls=binds, pid=os.getpid(), socket_activated=activated)
            if announce is not None:
                announce(binds[0])
            sdnotify.notify("READY=1")
            root.start_soon(sdnotify.run_watchdog)
        await trio.to_thread.run_sync(clear_address, store.root)
        log.info("http_stopped")
        root.cancel_scope.cancel()
    log.info("stopped")


def _listen_error(config: Config, exc: OSError) -> StartupError:
    where = f"{config.server.host}:{config.server.port}"
    if exc.errno == errno.EACCES and 0 < config.server.port < 1024:
        return StartupError(
            f"permission denied listening on {where}: ports below 1024 are privileged. "
            "Either start modeld through its socket unit, which binds the port for it "
            "(systemctl enable --now modeld.socket), or grant it CAP_NET_BIND_SERVICE "
            "(AmbientCapabilities=CAP_NET_BIND_SERVICE in the unit), or use a port of 1024 "
            "or higher ([server] port in the config, or --port 8080)"
        )
    if exc.errno == errno.EACCES:
        return StartupError(
            f"permission denied listening on {where}: a security policy forbids it; "
            "pick another [server] host or port"
        )
    if exc.errno == errno.EADDRINUSE:
        return StartupError(
            f"{where} is already in use: is another modeld running? "
            "(stop it, or pick another [server] port)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(
            f"cannot listen on {where}: no such address on this machine; check [server] host"
        )
    return StartupError(f"cannot listen on {where}: {exc.strerror or exc}")
