"""`modeld import FILE`: a local GGUF file made a custom model, through POST /models/create
and PUT /model/{id}/file (the daemon, running as its own user, never reads the user's files).
The file is checked (GGUF magic, an architecture some runtime runs) before anything is created,
and an upload that fails leaves no model behind."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from supervisor.cli import Out
    from supervisor.client import Api

EXIT_OK = 0


def cmd_import(api: Api, args: argparse.Namespace, out: Out) -> int:
    from supervisor.client import ClientError
    from supervisor.units import format_bytes

    path: Path = args.path
    if not path.is_file():
        raise ClientError(f"{path} is not a file")
    _check_architecture(path)
    if not args.copy:
        known = model_with_file(api, path)
        if known is not None:
            if out.json:
                out.data(known)
            elif out.tty:
                out.line(f"{path.name} is already imported as {known['id']}; "
                         "--copy imports it again")
            else:
                out.line(str(known["id"]))
            return EXIT_OK
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


def model_with_file(api: Api, path: Path) -> dict[str, Any] | None:
    """A downloaded model whose file has the same sha256 as `path`, if there is one. The file
    is read to hash it only when a downloaded model has its size (or an unknown one)."""
    import hashlib

    size = path.stat().st_size

    def may_match(model: dict[str, Any]) -> bool:
        known = (model.get("bytes") or {}).get("value")
        return bool(model.get("downloaded") and model.get("sha256")) and known in (None, size)

    candidates = [model for model in api.models() if may_match(model)]
    if not candidates:
        return None
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return next((model for model in candidates if model.get("sha256") == digest), None)


def _check_architecture(path: Path) -> None:
    """Refuse, before uploading anything, a file that does not start as GGUF does, or whose
    architecture no runtime runs (the daemon would refuse it too, after its first MiB)."""
    from actors.gguf import GGUFInvalid, architecture_from_prefix, check_magic, unrunnable_message
    from actors.runtimes import runnable
    from supervisor.client import ClientError

    with path.open("rb") as f:
        prefix = f.read(1024 * 1024)
    try:
        check_magic(prefix, str(path))  # also a special file (/proc/...) or an empty one
    except GGUFInvalid as exc:
        raise ClientError(exc.reason) from None
    architecture = architecture_from_prefix(prefix)
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
