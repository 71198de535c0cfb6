"""Resumable, segmented, verified HTTP download of one model file.

`download_file` writes into `dest.partial`, records what is done in `dest.partial.json` (the
sidecar) and publishes `dest` only complete and verified. It runs inside the caller's cancel
scope: a cancel stops the bytes at once and leaves the partial and an up-to-date sidecar, from
which the next call resumes with `Range` + `If-Range`. From an origin that does not serve byte
ranges nothing could resume, so nothing is kept. Bytes that are not a model file
(`DownloadRequest.magic`, `verify`) fail it.

Where things are: request.py (what is asked), errors.py (what can go wrong), origin.py (URL
rules, the probe, retries), fetch.py (one download from probe to publish), hashing.py (the
sha256). The partial and its sidecar are actors/partial.py; the bytes move in the pump child
(actors/pump.py, actors/pump_main.py, actors/pump_body.py); response heads are judged by
actors/heads.py, and the addresses connected to by actors/addresses.py, on both sides.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import trio

from actors.download.errors import (
    ChecksumMismatch,
    DiskError,
    DiskFull,
    DownloadError,
    FileInvalid,
    OriginError,
    OriginUnreachable,
    SizeMismatch,
    TooManyRedirects,
    TooSlow,
    UrlRefused,
)
from actors.download.fetch import Download
from actors.download.origin import (
    BACKOFF_BASE,
    Resolve,
    backoff_delay,
    check_url,
    open_client,
    resolve_host,
)
from actors.download.request import DownloadRequest, ProgressSink
from actors.heads import RETRY_AFTER_CAP, parse_retry_after
from actors.pump_body import tls_context

__all__ = [
    "BACKOFF_BASE",
    "RETRY_AFTER_CAP",
    "ChecksumMismatch",
    "DiskError",
    "DiskFull",
    "DownloadError",
    "DownloadRequest",
    "FileInvalid",
    "OriginError",
    "OriginUnreachable",
    "ProgressSink",
    "SizeMismatch",
    "TooManyRedirects",
    "TooSlow",
    "UrlRefused",
    "backoff_delay",
    "download_file",
    "parse_retry_after",
]


async def download_file(
    req: DownloadRequest,
    sink: ProgressSink,
    *,
    client: httpx.AsyncClient | None = None,
    clock: Callable[[], float] = trio.current_time,
    resolve: Resolve = resolve_host,
) -> None:
    """Download `req.url` to `req.dest`, resuming a partial left by an earlier call.

    Returns once `dest` is published (size, sha256, magic and `verify` checked when given).
    Raises DownloadError (see `code`); cancellation leaves the partial and its sidecar for the
    next call. `client` (tests, proxies) carries the probe; the bytes always move in the pump.
    `resolve` (tests) is how the probe resolves host names for the address rule
    (actors/addresses.py); the pump resolves and checks for itself.
    """
    url = check_url(req.url, allow_http=req.allow_http, previous=None)
    if client is not None:
        await Download(req, sink, client, clock, url, resolve=resolve).run()
        return
    # Loading the CA bundle takes ~30 ms the first time (then it is cached): not on the loop.
    trust = await trio.to_thread.run_sync(tls_context)
    own_client = open_client(req.stall_timeout, trust)
    try:
        await Download(req, sink, own_client, clock, url, resolve=resolve).run()
    finally:
        # Shielded and bounded: a cancelled download still closes its idle connections.
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await own_client.aclose()
