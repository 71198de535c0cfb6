"""The client side of the `modeld` command: talks to a running daemon over its HTTP API.

Commands use blocking HTTP (supervisor/client_http.py); `pull` runs under trio, because it
follows the download's WebSocket progress stream while it listens for Ctrl-C. Everything that
goes wrong is a `ClientError` whose message is meant for the person at the terminal.
"""

from __future__ import annotations

import json
import os
import signal
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import quote

import attrs

from actors.spec import is_valid_id
from supervisor.address import DEFAULT_STORAGE, running_url
from supervisor.client_http import FileChanged, Reply, Timeout, Transport, TransportError

if TYPE_CHECKING:
    import trio

DEFAULT_URL = "http://127.0.0.1:1000"
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELED", "UNKNOWN"})
# Quick commands get an answer within seconds; load, import and rm wait as long as the daemon
# itself allows (it bounds them with [runtime] load_timeout).
QUICK = Timeout(answer=60.0)
SLOW = Timeout(answer=None)
# An upload whose bytes stop moving for this long fails (the daemon may have answered early
# and stopped reading); once sent, the daemon checks and publishes the file within its own
# bounds, so the answer gets longer.
UPLOAD_STALL = 60.0
UPLOAD_ANSWER = 600.0

Json = dict[str, Any]


class ClientError(Exception):
    """A command failed; the message says why and, where it can, what to do."""


class DaemonUnreachable(ClientError):
    def __init__(self, url: str) -> None:
        super().__init__(f"no modeld answering at {url}: is the service running?")


class ApiError(ClientError):
    """The daemon answered with an error status; the message is the daemon's own."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# --- where the daemon is ------------------------------------------------------------------


@attrs.frozen
class Endpoint:
    url: str
    token: str | None = None

    def headers(self) -> dict[str, str]:
        if self.token is None:
            return {}
        return {"authorization": f"Bearer {self.token}"}

    def ws_url(self, path: str) -> str:
        scheme, rest = self.url.split("://", 1)
        return ("wss" if scheme == "https" else "ws") + "://" + rest + path


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def _connectable_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def _config_table(config: Json, name: str) -> Json:
    table = config.get(name)
    return table if isinstance(table, dict) else {}


def _read_config(config_path: Path | None) -> Json:
    """The daemon's config as TOML data, or {} when there is none to read."""
    if config_path is None:
        return {}
    try:
        return tomllib.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}


def storage_dirs_searched(config: Json) -> list[Path]:
    """Where a running daemon may have recorded its address, most specific first."""
    dirs = []
    configured = _config_table(config, "storage").get("dir")
    if isinstance(configured, str) and configured:
        dirs.append(Path(configured))
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():  # run from a source checkout (`make run`)
        dirs.append(checkout / "state")
    dirs.append(DEFAULT_STORAGE)
    return dirs


def resolve_endpoint(
    url: str | None, token: str | None, config_path: Path | None
) -> Endpoint:
    """Where the daemon is and how to authenticate.

    URL: `url`, else $MODELD_URL, else the address a running daemon recorded in its storage dir
    (the config's, this checkout's `state/` of `make run`, the default one), else the config's
    [server] host and port, else http://127.0.0.1:1000. Token: `token`, else $MODELD_TOKEN, else
    the config's token_file when this user can read it. An unreadable config is no error: the
    daemon may run as another user.
    """
    config = _read_config(config_path)
    server = _config_table(config, "server")
    chosen = url or os.environ.get("MODELD_URL") or running_url(storage_dirs_searched(config))
    if not chosen:
        chosen = DEFAULT_URL
        host, port = server.get("host", "127.0.0.1"), server.get("port", 1000)
        if isinstance(host, str) and isinstance(port, int) and 0 < port < 65536:
            chosen = f"http://{_connectable_host(host)}:{port}"
    secret = token or os.environ.get("MODELD_TOKEN") or None
    token_file = server.get("token_file")
    if secret is None and isinstance(token_file, str) and token_file:
        try:
            secret = Path(token_file).expanduser().read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError):
            secret = None
    return Endpoint(normalize_url(chosen), secret)


def model_path(model_id: str, suffix: str = "") -> str:
    """`/model/<id><suffix>`, after checking the id the way the daemon does."""
    if not is_valid_id(model_id):
        raise ClientError(
            f"malformed model id {model_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit (`modeld ls` lists them)"
        )
    return f"/model/{quote(model_id, safe='')}{suffix}"


# --- answers ------------------------------------------------------------------------------


def _error_from(status: int, body: bytes) -> ApiError:
    code, message = "http_error", ""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        code = str(data.get("error") or code)
        message = str(data.get("message") or "")
    if not message:
        text = body.decode("utf-8", "replace").strip()
        message = f"HTTP {status}" + (f": {text[:200]}" if text else "")
    if status == 401:
        message += " (pass --token or set MODELD_TOKEN)"
    return ApiError(message, status=status, code=code)


def checked(response: Reply) -> Reply:
    if response.status_code >= 400:
        raise _error_from(response.status_code, response.content)
    return response


def model_of(response: Reply) -> Json:
    try:
        data = response.json()
    except ValueError:
        raise ClientError(f"modeld answered {response.status_code} without JSON") from None
    if not isinstance(data, dict):
        raise ClientError("modeld answered with something that is not a model")
    return data


def _transport_error(endpoint: Endpoint, exc: TransportError) -> ClientError:
    if exc.phase == "connect":
        return DaemonUnreachable(endpoint.url)
    if exc.phase == "send" and exc.timed_out:
        return ClientError(f"modeld at {endpoint.url} stopped taking the upload")
    if exc.timed_out:
        return ClientError(f"modeld at {endpoint.url} did not answer in time")
    return ClientError(f"talking to modeld at {endpoint.url} failed: {exc}")


class Api:
    """Blocking calls to one daemon. Every method raises ClientError on failure."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._http = Transport(endpoint.url, endpoint.headers())

    def close(self) -> None:
        pass  # each request has a connection of its own

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, *, timeout: Timeout = QUICK, json: Any = None
    ) -> Reply:
        """One request (`json`: its body); raises ClientError, ApiError for an error status."""
        try:
            response = self._http.request(method, path, timeout=timeout, body=json)
        except TransportError as exc:
            raise _transport_error(self.endpoint, exc) from None
        return checked(response)

    def models(self) -> list[Json]:
        data = model_of(self.request("GET", "/models"))
        models = data.get("iterable")
        if not isinstance(models, list):
            raise ClientError("modeld answered /models without an 'iterable' list")
        return [m for m in models if isinstance(m, dict)]

    def model(self, model_id: str) -> Json:
        return model_of(self.request("GET", model_path(model_id)))

    def progress(self, model_id: str) -> Json:
        """The latest progress of the model's download (GET .../download/progress)."""
        return model_of(self.request("GET", model_path(model_id, "/download/progress")))

    def command(self, model_id: str, verb: str, *, timeout: Timeout = QUICK) -> Json:
        """POST /model/<id>/<verb> (download, download/cancel, load, unload)."""
        return model_of(self.request("POST", model_path(model_id, f"/{verb}"), timeout=timeout))

    def delete(self, model_id: str, *, keep_record: bool = False) -> None:
        """Unload, cancel and remove the files; also the record of a custom model unless
        `keep_record` (POST /models/<id>/delete, or .../delete/cache)."""
        model_path(model_id)
        suffix = "/delete/cache" if keep_record else "/delete"
        kwargs: dict[str, Any] = {"json": {}} if keep_record else {}
        self.request("POST", f"/models/{quote(model_id, safe='')}{suffix}", timeout=SLOW,
                     **kwargs)

    def create(self, seed: Json) -> Json:
        return model_of(self.request("POST", "/models/create", json=seed))

    def upload(
        self, model_id: str, path: Path, on_chunk: Callable[[int], None] | None = None,
        *, stall: float = UPLOAD_STALL,
    ) -> Json:
        """Send `path` as the model's file; the daemon checks it and publishes it atomically.
        Raises ClientError, also when the transfer stalls for `stall` seconds."""
        changed = ClientError(f"{path} changed while it was uploaded; import it once it is "
                              "complete")
        timeout = Timeout(send=stall, answer=UPLOAD_ANSWER)
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                response = checked(self._http.put_file(
                    model_path(model_id, "/file"), f, size, timeout=timeout, on_piece=on_chunk))
        except FileChanged:
            raise changed from None
        except TransportError as exc:
            raise _transport_error(self.endpoint, exc) from None
        return model_of(response)


# --- pull: follow a download until it ends ------------------------------------------------


class PullView(Protocol):
    """How a pull shows its progress (a rich bar, plain lines, or JSON lines)."""

    def update(self, progress: Json) -> None: ...
    def pause(self) -> None: ...
    def close(self) -> None: ...


Interrupt = Literal["ask", "leave", "cancel"]
PullResult = Literal["COMPLETED", "FAILED", "CANCELED", "LOST"]


@attrs.define
class PullOutcome:
    """How a pull ended. `result`: the terminal status the stream reported, or LOST when it
    ended without one. `interrupted`: what Ctrl-C decided (cancel, or leave it running)."""

    result: PullResult = "LOST"
    interrupted: Literal["leave", "cancel"] | None = None
    progress: Json = attrs.Factory(dict)
    model: Json = attrs.Factory(dict)
    error: ClientError | None = None
    prompt_open: bool = False  # the Ctrl-C question was on screen, unanswered, at the end


async def run_pull(
    endpoint: Endpoint,
    model_id: str,
    view: PullView,
    *,
    interrupt: Interrupt,
    ask: Callable[[], bool] | None = None,
    update: bool = False,
) -> PullOutcome:
    """Start (or join) the download of `model_id` and follow it to its end.

    On SIGINT: `cancel` cancels the download in the daemon; `leave` leaves it running; `ask`
    calls `ask()` in a thread (True: cancel) while the download goes on; a second SIGINT or
    the end of the download answers for the user. Raises ClientError when the daemon cannot
    be asked at all; errors after the download started are in the outcome. With `update`, the
    model's Hub source is re-resolved first (the answer's `update` says what came of it).
    """
    import trio  # only `pull` needs it: the other commands start faster without

    path = model_path(model_id)
    outcome = PullOutcome()
    with trio.open_signal_receiver(signal.SIGINT) as interrupts:
        with Api(endpoint) as api:

            async def post(suffix: str, body: Json | None = None) -> Json:
                # In a thread that a cancel abandons (the command ends right after).
                response = await trio.to_thread.run_sync(
                    lambda: api.request("POST", path + suffix, json=body),
                    abandon_on_cancel=True)
                return model_of(response)

            # Even when the file is already here, the stream answers: COMPLETED, then a close.
            outcome.model = await post("/download", {"update": True} if update else None)

            async def follow(done: trio.CancelScope) -> None:
                try:
                    await _follow_progress(endpoint, path, view, outcome)
                except ClientError as exc:
                    outcome.error = exc
                done.cancel()

            async def on_interrupt(done: trio.CancelScope) -> None:
                async for _ in interrupts:
                    decision = interrupt
                    if decision == "ask":
                        view.pause()
                        outcome.prompt_open = True
                        decision = await _ask(ask, interrupts)
                        outcome.prompt_open = False
                    outcome.interrupted = decision
                    if decision == "cancel":
                        # The stream may report CANCELED (and end this task) before the
                        # reply arrives; either way the decision is recorded.
                        try:
                            outcome.model = await post("/download/cancel")
                        except ClientError as exc:
                            outcome.error = exc
                    done.cancel()
                    return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow, nursery.cancel_scope)
                nursery.start_soon(on_interrupt, nursery.cancel_scope)
            view.close()
    return outcome


async def _ask(
    ask: Callable[[], bool] | None, interrupts: Any
) -> Literal["leave", "cancel"]:
    """The user's answer; another Ctrl-C while asking means: leave it running."""
    import trio

    if ask is None:
        return "leave"
    answer: Literal["leave", "cancel"] = "leave"
    async with trio.open_nursery() as nursery:

        async def prompt() -> None:
            nonlocal answer
            wanted = await trio.to_thread.run_sync(ask, abandon_on_cancel=True)
            answer = "cancel" if wanted else "leave"
            nursery.cancel_scope.cancel()

        async def again() -> None:
            await interrupts.__anext__()
            nursery.cancel_scope.cancel()

        nursery.start_soon(prompt)
        nursery.start_soon(again)
    return answer


async def _follow_progress(endpoint: Endpoint, path: str, view: PullView,
                           outcome: PullOutcome) -> None:
    from trio_websocket import (
        ConnectionClosed,
        ConnectionRejected,
        HandshakeError,
        open_websocket_url,
    )

    headers = [(k.encode(), v.encode()) for k, v in endpoint.headers().items()]
    url = endpoint.ws_url(path + "/download/progress")
    try:
        async with open_websocket_url(url, extra_headers=headers, connect_timeout=10) as ws:
            while True:
                try:
                    text = await ws.get_message()
                except ConnectionClosed:
                    return
                progress = json.loads(text)
                if not isinstance(progress, dict):
                    continue
                outcome.progress = progress
                view.update(progress)
                if progress.get("status") in TERMINAL:
                    outcome.result = (
                        progress["status"] if progress["status"] != "UNKNOWN" else "LOST"
                    )
                    return
    except ConnectionRejected as exc:
        raise _error_from(exc.status_code, exc.body or b"") from None
    except (OSError, HandshakeError):
        raise DaemonUnreachable(endpoint.url) from None
