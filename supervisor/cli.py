"""The `modeld` command: `serve` runs the daemon; the other commands are its client."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import attrs
import structlog
import trio

from supervisor.config import ConfigError, find_config_path, load_config
from supervisor.logs import setup_logging

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modeld", description="Local model supervisor daemon")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="TOML config file (default: $MODELD_CONFIG, "
                       "/etc/modeld/config.toml, else the built-in catalog)")
    serve.add_argument("--log-format", choices=("json", "console"), default="json")
    serve.add_argument("--storage-dir", help="override [storage] dir")
    serve.add_argument("--host", help="override [server] host")
    serve.add_argument("--port", type=int, help="override [server] port")
    return parser


def serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_format)
    log = structlog.get_logger("modeld")
    try:
        config = load_config(find_config_path(args.config))
    except ConfigError as exc:
        log.error("config_invalid", reason=str(exc))
        print(f"modeld: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # --storage-dir, then $STATE_DIRECTORY (systemd's StateDirectory=), then [storage] dir.
    state_dir = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    storage_dir = args.storage_dir or state_dir
    if storage_dir:
        config = attrs.evolve(config, storage=attrs.evolve(config.storage, dir=storage_dir))
    if args.host:
        config = attrs.evolve(config, server=attrs.evolve(config.server, host=args.host))
    if args.port is not None:
        config = attrs.evolve(config, server=attrs.evolve(config.server, port=args.port))

    from supervisor.daemon import StartupError, run_daemon

    try:
        trio.run(run_daemon, config)
    except StartupError as exc:
        log.error("startup_failed", reason=str(exc))
        print(f"modeld: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
