"""`modeld ps`, `modeld status`, `modeld du` and `modeld prune`: GET /status (and /models),
POST /storage/prune, shown for people (or as JSON with --json)."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from supervisor.cli import Out
    from supervisor.client import Api, Json

EXIT_OK = 0


def _status(api: Api) -> Json:
    from supervisor.client import ClientError, model_of

    data = model_of(api.request("GET", "/status"))
    if not isinstance(data.get("loaded"), list):
        raise ClientError("modeld answered /status without a 'loaded' list")
    return data


def until(iso: object, now: dt.datetime | None = None) -> str:
    """`in 4m59s` for a time ahead (an ISO 8601 UTC string), `-` for none."""
    from supervisor.views import format_duration

    if not isinstance(iso, str):
        return "-"
    when = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    left = (when - (now or dt.datetime.now(dt.UTC))).total_seconds()
    return f"in {format_duration(max(0.0, left))}"


def since(iso: object, now: dt.datetime | None = None) -> str:
    from supervisor.views import format_duration

    if not isinstance(iso, str):
        return "-"
    when = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    ago = ((now or dt.datetime.now(dt.UTC)) - when).total_seconds()
    return f"{format_duration(max(0.0, ago))} ago"


def ps_row(model: dict[str, Any]) -> tuple[str, ...]:
    from supervisor.units import format_bytes

    busy = model.get("slotsBusy") or 0
    idle = "busy" if busy else since(model.get("idleSince"))
    expires = until(model.get("expiresAt")) if model.get("expiresAt") else (
        "when unloaded" if model.get("state") == "loaded" else "-")
    return (
        str(model.get("id", "")),
        str(model.get("runtime") or "-"),
        str(model.get("pid") or "-"),
        format_bytes(model.get("rssBytes")),
        str(model.get("contextLength") or "-"),
        f"{busy}/{model.get('slots') or 1}",
        idle,
        expires if model.get("state") == "loaded" else str(model.get("state")),
    )


PS_HEADER = ("ID", "RUNTIME", "PID", "MEMORY", "CONTEXT", "BUSY", "IDLE", "UNLOADS")


def cmd_ps(api: Api, args: argparse.Namespace, out: Out) -> int:
    from supervisor.views import print_table

    loaded = _status(api)["loaded"]
    if out.json:
        out.data(loaded)
    elif not loaded:
        out.line("no model is loaded")
    else:
        print_table(out.line, out.tty, PS_HEADER, [ps_row(m) for m in loaded])
    return EXIT_OK


def cmd_status(api: Api, args: argparse.Namespace, out: Out) -> int:
    from supervisor.units import format_bytes
    from supervisor.views import format_duration, print_table, progress_line

    data = _status(api)
    if out.json:
        out.data(data)
        return EXIT_OK
    storage, memory = data.get("storage") or {}, data.get("memory") or {}
    out.line(f"modeld {data.get('version')} at {api.endpoint.url}, up "
             f"{format_duration(data.get('uptimeSeconds'))}, {data.get('models')} models")
    out.line(f"memory: {format_bytes(memory.get('availableBytes'))} available of "
             f"{format_bytes(memory.get('totalBytes'))}")
    out.line(f"disk: models take {format_bytes(storage.get('usedBytes'))}, "
             f"{format_bytes(storage.get('freeBytes'))} free in {storage.get('dir')}")
    loaded = data["loaded"]
    out.line(f"loaded: {len(loaded) or 'none'}")
    if loaded:
        print_table(out.line, out.tty, PS_HEADER, [ps_row(m) for m in loaded])
    downloads = data.get("downloads") or []
    out.line(f"downloads: {len(downloads) or 'none'}")
    for d in downloads:
        out.line("  " + progress_line({"model": d.get("id"), "status": d.get("status"),
                                       "bytes": d.get("bytes"), "total": d.get("total"),
                                       "percentage": d.get("percentage"),
                                       "bytesPerSecond": d.get("rate"),
                                       "etaSeconds": d.get("eta"),
                                       "retrying": d.get("retrying"),
                                       "queuePosition": d.get("queuePosition"),
                                       "connections": d.get("connections")}))
    return EXIT_OK


def cmd_du(api: Api, args: argparse.Namespace, out: Out) -> int:
    """Bytes per model (its published file, its partial download), totals and free space."""
    from supervisor.units import format_bytes
    from supervisor.views import print_table

    storage = _status(api).get("storage") or {}
    models: list[dict[str, Any]] = []
    for model in api.models():
        size = model.get("bytes")
        on_disk = size.get("value") if model.get("downloaded") and isinstance(size, dict) else 0
        partial = model.get("partialBytes") or 0
        if on_disk or partial:
            models.append({"id": model.get("id"), "state": model.get("state"),
                           "bytes": on_disk or 0, "partialBytes": partial})
    models.sort(key=lambda m: -(m["bytes"] + m["partialBytes"]))
    total = sum(m["bytes"] + m["partialBytes"] for m in models)
    if out.json:
        out.data({"models": models, "usedBytes": total, "freeBytes": storage.get("freeBytes"),
                  "dir": storage.get("dir")})
        return EXIT_OK
    rows: list[tuple[str, ...]] = [(str(m["id"]), str(m["state"]), format_bytes(m["bytes"]),
             format_bytes(m["partialBytes"]) if m["partialBytes"] else "-") for m in models]
    if rows:
        print_table(out.line, out.tty, ("ID", "STATE", "FILE", "PARTIAL"), rows)
    else:
        out.line("no model has files")
    out.line(f"{format_bytes(total)} in {len(models)} models; "
             f"{format_bytes(storage.get('freeBytes'))} free in {storage.get('dir')}")
    return EXIT_OK


def cmd_prune(api: Api, args: argparse.Namespace, out: Out) -> int:
    """List what no model owns, and remove it unless --dry-run."""
    from supervisor.client import model_of
    from supervisor.units import format_bytes

    body = {"dryRun": True} if args.dry_run else None
    data = model_of(api.request("POST", "/storage/prune", json=body))
    if out.json:
        out.data(data)
        return EXIT_OK
    files = data.get("files") or []
    for f in files:
        out.line(f"{format_bytes(f.get('bytes'))}\t{f.get('path')}\t({f.get('reason')})")
    verb = "would remove" if args.dry_run else "removed"
    out.line(f"{verb} {len(files)} files, {format_bytes(data.get('bytes'))}"
             if files else "nothing to prune: every file belongs to a model")
    return EXIT_OK
