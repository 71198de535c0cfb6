"""The `modeld` command: `serve` runs the daemon; the other commands are its client."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from supervisor.config import find_config_path

if TYPE_CHECKING:
    from supervisor.client import Api, Endpoint

# The daemon's heavier imports (structlog, trio, the app) wait until `serve` runs, so that
# client commands start fast.

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

CLIENT_HELP = """\
Client commands talk to a running daemon at --url (default: $MODELD_URL, else the [server]
host and port of the config file, else http://127.0.0.1:1000). With a token_file configured,
pass --token or set $MODELD_TOKEN. Exit codes: 0 done, 1 failed, 2 bad usage, 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    # Client options are accepted before or after the command: `modeld --json ls` and
    # `modeld ls --json`. SUPPRESS keeps a sub-command's default from hiding the global value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help="where modeld listens (default: $MODELD_URL, the config's "
                        "[server] host/port, else http://127.0.0.1:1000)")
    common.add_argument("--token", default=argparse.SUPPRESS,
                        help="bearer token (default: $MODELD_TOKEN, else the config's "
                        "token_file when readable)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable JSON output")
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="config file to read the address and token from")

    parser = argparse.ArgumentParser(
        prog="modeld", description="Local model supervisor daemon and its command line client.",
        epilog=CLIENT_HELP, parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", default=argparse.SUPPRESS,
                       help="TOML config file (default: $MODELD_CONFIG, "
                       "/etc/modeld/config.toml, else the built-in catalog)")
    serve.add_argument("--log-format", choices=("json", "console"), default="json")
    serve.add_argument("--storage-dir", help="override [storage] dir")
    serve.add_argument("--host", help="override [server] host")
    serve.add_argument("--port", type=int, help="override [server] port")

    def client(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, parents=[common], description=summary)

    client("ls", "list models: id, name, state, size, loaded")
    client("show", "one model as JSON").add_argument("id")
    pull = client("pull", "download a model, showing its progress until it is done")
    pull.add_argument("id")
    pull.add_argument("--cancel-on-interrupt", action="store_true",
                      help="on Ctrl-C cancel the download without asking (default: ask at a "
                      "terminal; otherwise leave it running in modeld)")
    client("cancel", "cancel a running download (its partial file is kept)").add_argument("id")
    client("load", "load a downloaded model into memory").add_argument("id")
    client("unload", "unload a model").add_argument("id")
    client("rm", "unload a model and delete its files (and record, if custom)").add_argument(
        "id")
    imp = client("import", "register a local GGUF file as a custom model; prints its id")
    imp.add_argument("path", type=Path)
    imp.add_argument("--name", help="display name (default: the file name)")
    imp.add_argument("--model-type", help="ctransformers model type (default: llama)")
    imp.add_argument("--description")
    return parser


def serve(args: argparse.Namespace) -> int:
    import structlog
    import trio

    from supervisor.config import ConfigError, load_config
    from supervisor.logs import setup_logging

    setup_logging(args.log_format)
    log = structlog.get_logger("modeld")
    try:
        config = load_config(find_config_path(getattr(args, "config", None)))
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


# --- client commands ----------------------------------------------------------------------


@attrs.frozen
class Out:
    """Where client output goes: rich for a person at a terminal, plain text for pipes,
    JSON with --json."""

    json: bool
    tty: bool

    def line(self, text: str) -> None:
        print(text, flush=True)

    def data(self, value: Any) -> None:
        print(json.dumps(value, indent=2), flush=True)

    def error(self, text: str) -> None:
        print(f"modeld: {text}", file=sys.stderr, flush=True)


def _table(out: Out, models: list[dict[str, Any]]) -> None:
    from supervisor.client import model_row

    header = ("ID", "NAME", "STATE", "SIZE", "LOADED")
    rows = [model_row(m) for m in models]
    if out.tty:
        from rich.console import Console
        from rich.table import Table

        table = Table(*header, box=None, header_style="bold", pad_edge=False)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        out.line("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def cmd_ls(api: Api, args: argparse.Namespace, out: Out) -> int:
    models = api.models()
    if out.json:
        out.data(models)
    else:
        _table(out, models)
    return EXIT_OK


def cmd_show(api: Api, args: argparse.Namespace, out: Out) -> int:
    model = api.model(args.id)
    if out.tty and not out.json:
        from rich.console import Console

        Console().print_json(data=model)
    else:
        out.data(model)
    return EXIT_OK


def cmd_load(api: Api, args: argparse.Namespace, out: Out) -> int:
    from supervisor.client import SLOW

    model = api.command(args.id, "load", timeout=SLOW)
    if out.json:
        out.data(model)
    else:
        seconds = model.get("loadSeconds")
        took = f" in {seconds:.3g} s" if isinstance(seconds, int | float) else ""
        out.line(f"loaded {args.id}{took}")
    return EXIT_OK


def cmd_unload(api: Api, args: argparse.Namespace, out: Out) -> int:
    model = api.command(args.id, "unload")
    if out.json:
        out.data(model)
    else:
        out.line(f"unloaded {args.id}")
    return EXIT_OK


def cmd_cancel(api: Api, args: argparse.Namespace, out: Out) -> int:
    from supervisor.client import format_bytes

    before = api.model(args.id)
    model = api.command(args.id, "download/cancel")
    if out.json:
        out.data(model)
    elif not before.get("downloading"):
        out.line(f"no download of {args.id} is running ({model.get('state', 'unknown')})")
    else:
        kept = model.get("partialBytes") or 0
        out.line(f"canceled the download of {args.id}; {format_bytes(kept)} kept, "
                 f"`modeld pull {args.id}` resumes it")
    return EXIT_OK


def cmd_rm(api: Api, args: argparse.Namespace, out: Out) -> int:
    custom = api.model(args.id).get("custom")
    api.delete(args.id)
    if out.json:
        out.data({"id": args.id, "deleted": True})
    elif custom:
        out.line(f"removed {args.id}")
    else:
        out.line(f"removed the files of {args.id}; it stays in the catalog")
    return EXIT_OK


def cmd_import(api: Api, args: argparse.Namespace, out: Out) -> int:
    from supervisor.client import ClientError, format_bytes

    path: Path = args.path
    if not path.is_file():
        raise ClientError(f"{path} is not a file")
    _check_architecture(path)
    name = args.name or path.name.removesuffix(".gguf")
    seed: dict[str, Any] = {"name": name}
    if args.model_type:
        seed["modelType"] = args.model_type
    if args.description:
        seed["description"] = args.description
    model_id = str(api.create(seed)["id"])
    try:
        model = _upload(api, model_id, path, out)
    except BaseException:
        # No half-made model is left behind: without its file the record is useless.
        try:
            api.delete(model_id)
        except ClientError:
            pass
        raise
    if out.json:
        out.data(model)
    elif out.tty:
        out.line(f"imported {path.name} as {model_id} "
                 f"({format_bytes(path.stat().st_size)})")
    else:
        out.line(model_id)
    return EXIT_OK


def _check_architecture(path: Path) -> None:
    """Refuse, before uploading anything, a file whose architecture no runtime runs (the
    daemon would refuse it too, after its first MiB)."""
    from actors.gguf import architecture_from_prefix, unrunnable_message
    from actors.runtimes import runnable
    from supervisor.client import ClientError

    with path.open("rb") as f:
        architecture = architecture_from_prefix(f.read(1024 * 1024))
    if architecture is not None and not runnable(architecture):
        raise ClientError(unrunnable_message(architecture))


def _upload(api: Api, model_id: str, path: Path, out: Out) -> dict[str, Any]:
    if not out.tty or out.json:
        result: dict[str, Any] = api.upload(model_id, path)
        return result
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn("[bold]upload"), BarColumn(), DownloadColumn(binary_units=False),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("upload", total=path.stat().st_size)
        result = api.upload(model_id, path, lambda n: bar.advance(task, n))
    return result


def cmd_pull(args: argparse.Namespace, out: Out, endpoint: Endpoint) -> int:
    import trio

    from supervisor import client

    view: client.PullView
    if out.json:
        view = client.JsonPullView(out.line)
    elif out.tty:
        view = client.RichPullView(args.id)
    else:
        view = client.PlainPullView(out.line)
    interrupt: client.Interrupt = "leave"
    if args.cancel_on_interrupt:
        interrupt = "cancel"
    elif sys.stdin.isatty():
        interrupt = "ask"
    try:
        outcome = trio.run(
            lambda: client.run_pull(endpoint, args.id, view, interrupt=interrupt,
                                    ask=client.ask_on_terminal(args.id))
        )
    finally:
        view.close()
    progress, model_id = outcome.progress, args.id
    if outcome.result == "COMPLETED":  # even if Ctrl-C came too late to matter
        if not out.json:
            known = outcome.model.get("bytes")
            size = client.format_bytes(progress.get("total") or progress.get("bytes") or (
                known.get("value") if isinstance(known, dict) else None))
            already = "already " if outcome.model.get("downloaded") else ""
            out.line(f"{model_id} {already}downloaded ({size})")
        return EXIT_OK
    if outcome.error is not None:
        raise outcome.error
    if outcome.interrupted == "cancel":
        kept = client.format_bytes(outcome.model.get("partialBytes") or progress.get("bytes"))
        out.error(f"interrupted: canceled the download of {model_id} ({kept} kept; "
                  f"`modeld pull {model_id}` resumes it)")
        return EXIT_INTERRUPTED
    if outcome.interrupted == "leave":
        out.error(f"interrupted: the download of {model_id} goes on in modeld; "
                  f"`modeld pull {model_id}` watches it again, `modeld cancel {model_id}` "
                  "stops it")
        return EXIT_INTERRUPTED
    if outcome.result == "FAILED":
        out.error(f"the download of {model_id} failed: {progress.get('error') or 'unknown'}")
        return EXIT_ERROR
    if outcome.result == "CANCELED":
        out.error(f"the download of {model_id} was canceled; "
                  f"`modeld pull {model_id}` resumes it")
        return EXIT_ERROR
    out.error(f"lost the progress of {model_id} before the download ended (did modeld stop? "
              "an interrupted download resumes when it starts again)")
    return EXIT_ERROR


COMMANDS: dict[str, Callable[[Api, argparse.Namespace, Out], int]] = {
    "ls": cmd_ls, "show": cmd_show, "load": cmd_load, "unload": cmd_unload,
    "cancel": cmd_cancel, "rm": cmd_rm, "import": cmd_import,
}


def run_client(args: argparse.Namespace) -> int:
    from supervisor.client import Api, ClientError, resolve_endpoint

    out = Out(json=getattr(args, "json", False), tty=sys.stdout.isatty())
    config = getattr(args, "config", None)
    if config is not None and not Path(config).is_file():
        out.error(f"no config file at {config}")
        return EXIT_CONFIG
    endpoint = resolve_endpoint(getattr(args, "url", None), getattr(args, "token", None),
                                find_config_path(config))
    try:
        if args.command == "pull":
            return cmd_pull(args, out, endpoint)
        with Api(endpoint) as api:
            return COMMANDS[args.command](api, args, out)
    except ClientError as exc:
        out.error(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        out.error("interrupted")
        return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return run_client(args)


if __name__ == "__main__":
    sys.exit(main())
