"""Benchmark 5: cancel latency, from POST cancel to the last body byte the origin sends.

The origin is a small threaded HTTP/1.1 server in this process (ranges, ETag, keep-alive) that
sends each connection's bytes in small paced chunks and stamps every successful send with
time.monotonic(), so "the last byte the origin sent" is known to about a millisecond.
Reference: the same measurement for a `curl` process killed with SIGKILL (the floor of the
method: kernel and origin reaction time).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import random
import signal
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx

from bench.common import (
    MiB,
    Result,
    Row,
    catalog_entry,
    delete_model,
    env_float,
    env_int,
    log,
    median,
    percentile,
    post_ok,
    run_daemon,
    which,
)

_BLOCK = b"GGUF" + os.urandom(MiB - 4)  # modeld stops a download that is not GGUF


class _State:
    def __init__(self, size: int, rate: float) -> None:
        self.size = size
        self.rate = rate  # bytes per second per connection
        self.lock = threading.Lock()
        self.last_send = 0.0
        self.bytes_sent = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        state = self.server.state
        start, end, status = 0, state.size, 200
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes="):
            first, _, last = wanted[6:].partition("-")
            start = int(first) if first else 0
            end = min(int(last) + 1, state.size) if last else state.size
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", '"bench-cancel"')
        self.send_header("Content-Type", "application/octet-stream")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{state.size}")
        self.end_headers()
        if not body:
            return
        chunk = 8192
        began = time.monotonic()
        pos, sent = start, 0
        try:
            while pos < end:
                n = min(chunk, end - pos)
                off = pos % MiB
                data = _BLOCK[off:off + n] if off + n <= MiB else (_BLOCK + _BLOCK)[off:off + n]
                self.wfile.write(data)
                now = time.monotonic()
                with state.lock:
                    state.last_send = now
                    state.bytes_sent += n
                pos += n
                sent += n
                delay = began + sent / state.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        except OSError:
            self.close_connection = True


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    state: _State


@contextlib.contextmanager
def run_origin(size: int, rate: float) -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = _State(size, rate)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _wait_flowing(state: _State, more: int, timeout: float = 30) -> None:
    target = state.bytes_sent + more
    deadline = time.monotonic() + timeout
    while state.bytes_sent < target:
        if time.monotonic() > deadline:
            raise TimeoutError("the download does not flow")
        time.sleep(0.005)


def _last_byte_after(state: _State, t0: float, settle: float = 0.5) -> float:
    time.sleep(settle)
    with state.lock:
        return (state.last_send - t0) * 1000


def bench_cancel() -> Result:
    n = env_int("BENCH_CANCELS", 20)
    rate = env_float("BENCH_CANCEL_RATE", 8 * MiB)  # per connection
    size = env_int("BENCH_CANCEL_BYTES", 256 * MiB)
    rng = random.Random(8)
    modeld_ms: list[float] = []
    curl_ms: list[float] = []
    curl = which("curl")
    with run_origin(size, rate) as origin:
        url = f"http://127.0.0.1:{origin.server_address[1]}/cancel.gguf"
        state = origin.state
        with run_daemon("cancel", [catalog_entry("c", url, size=size)]) as daemon, \
                httpx.Client(base_url=daemon.url, timeout=30, trust_env=False) as http:
            for i in range(n):
                post_ok(http, "/model/c/download")
                _wait_flowing(state, 2 * MiB)
                time.sleep(rng.uniform(0.1, 0.5))
                t0 = time.monotonic()
                post_ok(http, "/model/c/download/cancel")
                modeld_ms.append(_last_byte_after(state, t0))
                delete_model(http, "c")
                if curl is not None:
                    proc = subprocess.Popen([curl, "-s", "-o", "/dev/null", url])
                    _wait_flowing(state, 2 * MiB)
                    time.sleep(rng.uniform(0.1, 0.5))
                    t0 = time.monotonic()
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    curl_ms.append(_last_byte_after(state, t0))
                log(f"cancel {i}: modeld {modeld_ms[-1]:.1f} ms"
                    + (f", curl SIGKILL {curl_ms[-1]:.1f} ms" if curl_ms else ""))
    p99 = percentile(modeld_ms, 99)
    ref = f"curl SIGKILL: p50 {median(curl_ms):.1f} ms, p99 {percentile(curl_ms, 99):.1f} ms" \
        if curl_ms else "-"
    return Result("cancel", "Cancel latency", [
        Row(f"5. POST cancel -> origin's last byte ({n} cancels, 8 connections)",
            f"p50 {median(modeld_ms):.1f} ms, p99 {p99:.1f} ms", ref, f"p99 {p99:.1f} ms",
            "p99 < 100 ms", p99 < 100),
    ], {"modeld_ms": modeld_ms, "curl_kill_ms": curl_ms, "rate_per_connection": rate})
