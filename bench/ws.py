"""Download helpers over the daemon's own API: POST download, then follow the progress
WebSocket until its terminal message."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

TERMINAL = {"COMPLETED", "FAILED", "CANCELED"}


def ws_url(base: str, model_id: str) -> str:
    return base.replace("http://", "ws://", 1) + f"/model/{model_id}/download/progress"


async def follow(base: str, model_id: str) -> dict[str, Any]:
    """The terminal progress message of the download running (or just finished)."""
    last: dict[str, Any] = {}
    async with open_websocket_url(ws_url(base, model_id)) as ws:
        try:
            while True:
                last = json.loads(await ws.get_message())
                if last.get("status") in TERMINAL:
                    return last
        except ConnectionClosed:
            return last


async def timed_download_async(base: str, model_id: str) -> tuple[float, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=base, timeout=60, trust_env=False) as http:
        started = time.perf_counter()
        response = await http.post(f"/model/{model_id}/download")
        response.raise_for_status()
        final = await follow(base, model_id)
        return time.perf_counter() - started, final


def timed_download(base: str, model_id: str) -> float:
    """Seconds from POST download to COMPLETED on the progress WebSocket (sha256 included)."""
    seconds, final = trio.run(timed_download_async, base, model_id)
    if final.get("status") != "COMPLETED":
        raise RuntimeError(f"{model_id}: download ended with {final}")
    return seconds
