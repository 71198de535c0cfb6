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

from supervisor import __version__
from supervisor.cli_import import cmd_import
from supervisor.cli_status import cmd_du, cmd_prune, cmd_ps, cmd_status
from supervisor.config import find_config_path

if TYPE_CHECKING:
    from supervisor.client import Api, Endpoint

# The daemon's heavier imports (structlog, trio, the app) wait until `serve` runs, so that
# client commands start fast.

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: the reader of our output went away (`modeld ls | head`)

CLIENT_HELP = """\
Client commands talk to a running daemon at --url (default: $MODELD_URL, else the [server]
host and port of the config file, else http://127.0.0.1:1000). With a token_file configured,
pass --token or set $MODELD_TOKEN. Exit codes: 0 done, 1 failed, 2 bad usage, 130 interrupted,
141 the output pipe closed early.
"""


class StdoutClosed(Exception):
    """The reader of stdout went away (a pipe into `head`); not an OSError, so that no
    network error handler mistakes it for the daemon going away."""


def _closed_pipe_only(exc: BaseException) -> bool:
    if isinstance(exc, StdoutClosed):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_closed_pipe_only(e) for e in exc.exceptions)
    return False


def _quiet_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush cannot fail noisily."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


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
    parser.add_argument("--version", action="version", version=f"modeld {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", default=argparse.SUPPRESS,
                       help="TOML config file (default: $MODELD_CONFIG, "
                       "/etc/modeld/config.toml, else the built-in catalog)")
    serve.add_argument("--log-format", choices=("json", "console"), default="json")
    serve.add_argument("--storage-dir", help="override [storage] dir")
    serve.add_argument("--host", help="override [server] host")
    serve.add_argument("--port", type=port_number, help="override [server] port")

    def client(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, parents=[common], description=summary)

    client("ls", "list models: id, name, state, size, loaded")
    client("ps", "list loaded models: runtime, pid, memory, context, slots busy, expiry")
    client("status", "the daemon at a glance: version, uptime, loaded models, downloads, "
           "memory and disk")
    client("du", "disk use: bytes per model (file and partial download) and free space")
    client("prune", "remove files no model owns (partials of deleted models, stale temp "
           "files), listing them").add_argument(
        "--dry-run", action="store_true", help="list them only")
    client("show", "one model as JSON").add_argument("id")
    pull = client("pull", "download a model, showing its progress until it is done")
    pull.add_argument("id", help="a model id, or a Hub reference (hf.co/USER/REPO[:QUANT]"
                      "[@REVISION], hf.co/USER/REPO/FILE.gguf, a huggingface.co URL): the "
                      "model is created first if needed")
    pull.add_argument("--cancel-on-interrupt", action="store_true",
                      help="on Ctrl-C cancel the download without asking (default: ask at a "
                      "terminal; otherwise leave it running in modeld)")
    client("cancel", "cancel a running download (a resumable partial is kept)").add_argument("id")
    client("load", "load a downloaded model into memory").add_argument("id")
    client("unload", "unload a model").add_argument("id")
    rm = client("rm", "unload a model and delete its files (and record, if custom)")
    rm.add_argument("id")
    rm.add_argument("--keep-record", action="store_true",
                    help="keep a custom model registered: remove only its files")
    imp = client("import", "register a local GGUF file as a custom model; prints its id")
    imp.add_argument("path", type=Path)
    imp.add_argument("--name", help="display name (default: the file name)")
    imp.add_argument("--model-type", help="ctransformers model type (default: llama)")
    imp.add_argument("--description")
    imp.add_argument("--copy", action="store_true",
                     help="import the file again even if a model already has it")
    return parser


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: use 1-65535 (0: any free port)")
    return port


def serve(args: argparse.Namespace) -> int:
    import structlog
    import trio

    from supervisor.config import ConfigError, load_config
    from supervisor.logs import setup_logging

    setup_logging(args.log_format)
    log = structlog.get_logger("modeld")

    def failed(reason: str, code: int) -> int:
        """Every start-up failure: one event, one line on stderr, exit 2 (config) or 1."""
        log.error("startup_failed", reason=reason, exit_code=code)
        print(f"modeld: {reason}", file=sys.stderr)
        return code

    try:
        config = load_config(find_config_path(getattr(args, "config", None)))
        # --storage-dir, then $STATE_DIRECTORY (systemd's StateDirectory=), then [storage] dir.
        state_dir = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        storage_dir = args.storage_dir or state_dir
        if storage_dir:
            config = attrs.evolve(config, storage=attrs.evolve(config.storage, dir=storage_dir))
        if args.host:
            config = attrs.evolve(config, server=attrs.evolve(config.server, host=args.host))
        if args.port is not None:
            config = attrs.evolve(config, server=attrs.evolve(config.server, port=args.port))
    except ConfigError as exc:
        return failed(str(exc), EXIT_CONFIG)
    except ValueError as exc:  # an override the config's own rules refuse
        return failed(f"command line: {exc}", EXIT_CONFIG)

    from supervisor.daemon import StartupError, run_daemon

    def announce(url: str) -> None:
        """For a person at a console: where it listens and how the CLI reaches it."""
        from supervisor.client import storage_dirs_searched

        cli = sys.argv[0] if Path(sys.argv[0]).name == "modeld" else "modeld"
        searched = {d.expanduser().resolve() for d in storage_dirs_searched({})}
        how = (f"`{cli} ls` finds it by itself" if config.storage.path().resolve() in searched
               else f"use `{cli} --url {url} ls`")
        print(f"modeld is listening on {url}: {how} (or set MODELD_URL={url}).", flush=True)

    try:
        trio.run(run_daemon, config, announce if args.log_format == "console" else None)
    except StartupError as exc:
        return failed(str(exc), EXIT_ERROR)
    return EXIT_OK


# --- client commands ----------------------------------------------------------------------


@attrs.frozen
class Out:
    """Where client output goes: rich for a person at a terminal, plain text for pipes,
    JSON with --json."""

    json: bool
    tty: bool

    def line(self, text: str) -> None:
        try:
            print(text, flush=True)
        except BrokenPipeError:
            raise StdoutClosed from None

    def data(self, value: Any) -> None:
        self.line(json.dumps(value, indent=2))

    def error(self, text: str) -> None:
        print(f"modeld: {text}", file=sys.stderr, flush=True)


def _table(out: Out, models: list[dict[str, Any]]) -> None:
    from supervisor.views import model_row, print_table

    print_table(out.line, out.tty, ("ID", "NAME", "STATE", "SIZE", "LOADED"),
                [model_row(m) for m in models])


def cmd_ls(api: Api, args: argparse.Namespace, out: Out) -> int:
    models = api.models()
    for model in models:  # how far each running download is
        if model.get("downloading") and isinstance(model.get("id"), str):
            model["progress"] = api.progress(model["id"])
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
        evicted = model.get("evicted")
        room = (f" (unloaded {', '.join(map(str, evicted))} to make room)"
                if isinstance(evicted, list) and evicted else "")
        out.line(f"loaded {args.id}{took}{room}")
    return EXIT_OK


def cmd_unload(api: Api, args: argparse.Namespace, out: Out) -> int:
    was_loaded = api.model(args.id).get("loaded")
    model = api.command(args.id, "unload")
    if out.json:
        out.data(model)
    elif was_loaded:
        out.line(f"unloaded {args.id}")
    else:
        out.line(f"{args.id} was not loaded")
    return EXIT_OK


def cmd_cancel(api: Api, args: argparse.Namespace, out: Out) -> int:
    before = api.model(args.id)
    model = api.command(args.id, "download/cancel")
    if out.json:
        out.data(model)
    elif not before.get("downloading"):
        out.line(f"no download of {args.id} is running ({model.get('state', 'unknown')})")
    else:
        out.line(f"cancelled the download of {args.id}; "
                 f"{resume_hint(args.id, model.get('partialBytes'))}")
    return EXIT_OK


def resume_hint(model_id: str, kept: object) -> str:
    """What a cancelled download left, from the model's `partialBytes` after the cancel. The
    daemon keeps a partial only when it can resume it: an origin that does not serve byte
    ranges leaves none."""
    from supervisor.units import format_bytes

    if isinstance(kept, int) and kept > 0:
        return f"{format_bytes(kept)} kept; `modeld pull {model_id}` resumes it"
    return (f"nothing kept to resume from (the origin does not serve byte ranges, or no bytes "
            f"had arrived); `modeld pull {model_id}` starts over")


def cmd_rm(api: Api, args: argparse.Namespace, out: Out) -> int:
    before = api.model(args.id)
    custom, keep = before.get("custom"), args.keep_record
    had_files = before.get("downloaded") or before.get("downloading") or before.get(
        "partialBytes")
    api.delete(args.id, keep_record=keep)
    if out.json:
        out.data({"id": args.id, "deleted": True, "record_kept": bool(keep or not custom),
                  "had_files": bool(had_files)})
    elif custom and not keep:
        out.line(f"removed {args.id}")
    elif not had_files:
        out.line(f"nothing to remove: {args.id} has no files (it stays "
                 f"{'registered' if custom else 'in the catalog'})")
    else:
        out.line(f"removed the files of {args.id}; it stays "
                 f"{'registered' if custom else 'in the catalog'}")
    return EXIT_OK


def cmd_pull(args: argparse.Namespace, out: Out, endpoint: Endpoint) -> int:
    import trio

    from supervisor import client, views
    from supervisor.hub_refs import looks_like_reference
    from supervisor.units import format_bytes

    update = False  # a reference to a downloaded model: re-resolved, updated if it moved
    if looks_like_reference(args.id):
        args.id, update = _model_for_reference(endpoint, args.id, out)
    view: client.PullView
    if out.json:
        view = views.JsonPullView(out.line)
    elif out.tty:
        view = views.RichPullView(args.id)
    else:
        view = views.PlainPullView(out.line)
    interrupt: client.Interrupt = "leave"
    if args.cancel_on_interrupt:
        interrupt = "cancel"
    elif sys.stdin.isatty():
        interrupt = "ask"
    try:
        try:
            outcome = trio.run(
                lambda: client.run_pull(endpoint, args.id, view, interrupt=interrupt,
                                        ask=views.ask_on_terminal(args.id), update=update))
        except client.ApiError as exc:
            if not (update and exc.status == 503):
                raise
            # The Hub cannot be reached: the downloaded model is what there is (offline).
            out.error(f"could not check {args.id} for an update: {exc}")
            outcome = trio.run(
                lambda: client.run_pull(endpoint, args.id, view, interrupt=interrupt,
                                        ask=views.ask_on_terminal(args.id)))
    finally:
        view.close()
    if outcome.prompt_open:  # the download ended first: the answer is no longer needed
        print(" (no longer needed: the download ended)", file=sys.stderr, flush=True)
    progress, model_id = outcome.progress, args.id
    if outcome.result == "COMPLETED":  # even if Ctrl-C came too late to matter
        if not out.json:
            known = outcome.model.get("bytes")
            size = format_bytes(progress.get("total") or progress.get("bytes") or (
                known.get("value") if isinstance(known, dict) else None))
            already = "already " if outcome.model.get("downloaded") else ""
            updated = outcome.model.get("update")
            if updated == "up to date":
                revision = str(outcome.model.get("revision") or "")[:12]
                out.line(f"{model_id} is up to date ({outcome.model.get('file')} at {revision})")
            elif updated == "updating":
                out.line(f"{model_id} updated ({size})")
            else:
                out.line(f"{model_id} {already}downloaded ({size})")
        return EXIT_OK
    if outcome.error is not None:
        raise outcome.error
    if outcome.interrupted == "cancel":
        # outcome.model is the cancel's reply (its partialBytes are what was kept), unless
        # the cancel failed, in which case the last progress is the best guess.
        kept = outcome.model.get("partialBytes", progress.get("bytes"))
        out.error(f"interrupted: cancelled the download of {model_id}; "
                  f"{resume_hint(model_id, kept)}")
        return EXIT_INTERRUPTED
    if outcome.interrupted == "leave":
        out.error(f"interrupted: the download of {model_id} goes on in modeld; "
                  f"`modeld pull {model_id}` watches it again, `modeld cancel {model_id}` "
                  "stops it")
        return EXIT_INTERRUPTED
    if outcome.result == "FAILED":
        out.error(f"the download of {model_id} failed: {progress.get('error') or 'unknown'}")
        return EXIT_ERROR
    if outcome.result == "CANCELED":  # its bytes: what the partial kept
        out.error(f"the download of {model_id} was cancelled; "
                  f"{resume_hint(model_id, progress.get('bytes'))}")
        return EXIT_ERROR
    out.error(f"lost the progress of {model_id} before the download ended (did modeld stop? "
              "an interrupted download resumes when it starts again)")
    return EXIT_ERROR


def _model_for_reference(endpoint: Endpoint, reference: str, out: Out) -> tuple[str, bool]:
    """The id of the model `reference` names, created (resolved and pinned) if needed, and
    whether it was downloaded already (then a pull updates it)."""
    from supervisor.client import SLOW, Api, ClientError, model_of

    with Api(endpoint) as api:
        model = model_of(api.request("POST", "/models/create", json={"source": reference},
                                     timeout=SLOW))
    model_id = model.get("id")
    if not isinstance(model_id, str):
        raise ClientError("modeld answered the create without a model id")
    if not out.json:
        revision = str(model.get("revision") or "")[:12]
        out.line(f"{reference}: {model_id} ({model.get('file')} at {revision})")
    return model_id, model.get("downloaded") is True


COMMANDS: dict[str, Callable[[Api, argparse.Namespace, Out], int]] = {
    "ls": cmd_ls, "show": cmd_show, "load": cmd_load, "unload": cmd_unload,
    "cancel": cmd_cancel, "rm": cmd_rm, "import": cmd_import, "ps": cmd_ps,
    "status": cmd_status, "du": cmd_du, "prune": cmd_prune,
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
    try:
        return run_client(args)
    except BaseException as exc:
        if not _closed_pipe_only(exc):
            raise
        _quiet_stdout()
        return EXIT_PIPE_CLOSED


if __name__ == "__main__":
    sys.exit(main())
