"""What every benchmark shares: sizes from the environment, the machine, statistics, a local
nginx origin, a real modeld daemon (tests/daemon.py), process-tree memory.

Benchmarks never touch the network beyond 127.0.0.1 and never fetch a model from a hub: their
files are random bytes or tiny random-weight GGUFs written on the spot.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import psutil

from tests.daemon import ROOT, Daemon
from tests.gguf_factory import gguf_header

MiB = 1024 * 1024
GiB = 1024 * MiB

WORK = Path(os.environ.get("BENCH_DIR", "/tmp/modeld-bench"))
FILES = WORK / "files"


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


ROUNDS = max(1, env_int("BENCH_ROUNDS", 3))


# --------------------------------------------------------------------------- results


@attrs.define
class Row:
    """One line of the BENCHMARKS.md table."""

    benchmark: str
    modeld: str
    reference: str
    value: str  # the ratio or the value the target is about
    target: str
    met: bool | None  # None: not measured / no target

    def cells(self) -> list[str]:
        met = {True: "yes", False: "**no**", None: "-"}[self.met]
        return [self.benchmark, self.modeld, self.reference, self.value, self.target, met]


@attrs.define
class Result:
    name: str
    title: str
    rows: list[Row]
    details: dict[str, Any] = attrs.Factory(dict)
    seconds: float = 0.0
    when: str = ""


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cpu_ticks() -> list[int]:
    """The machine's CPU time so far, per state (the `cpu` line of /proc/stat)."""
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:]]


def steal_share(before: list[int], after: list[int]) -> float:
    """The share (0..1) of CPU time between two cpu_ticks() that the hypervisor took."""
    spent = [b - a for a, b in zip(before, after, strict=True)]
    return spent[7] / max(1, sum(spent[:8]))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def rate(n_bytes: float, seconds: float) -> float:
    return n_bytes / seconds if seconds > 0 else float("nan")


def mbps(bytes_per_second: float) -> str:
    return f"{bytes_per_second / MiB:.0f} MiB/s"


def log(*parts: object) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the machine


def machine() -> dict[str, Any]:
    mem = psutil.virtual_memory()
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    return {
        "cores": os.cpu_count() or 0,
        "cpu": cpu_model,
        "memory": f"{mem.total / GiB:.1f} GiB",
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nginx": tool_version(["nginx", "-v"]),
        "curl": tool_version(["curl", "--version"]),
        "aria2c": tool_version(["aria2c", "--version"]),
    }


def tool_version(cmd: list[str]) -> str:
    exe = which(cmd[0])
    if exe is None:
        return "missing"
    out = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, check=False)
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- data files


def random_file(name: str, size: int) -> tuple[Path, str]:
    """A GGUF file of `size` bytes under FILES (a header, then random bytes: modeld downloads
    only GGUF files), and its sha256 (both cached across runs)."""
    FILES.mkdir(parents=True, exist_ok=True)
    path = FILES / name
    digest_path = path.with_name(path.name + ".sha256")
    head = gguf_header(size)
    if (path.exists() and path.stat().st_size == size and digest_path.exists()
            and _starts_with(path, head)):
        return path, digest_path.read_text().strip()
    log(f"writing a {size / MiB:.0f} MiB GGUF file of random bytes to {path}")
    h = hashlib.sha256(head)
    block = 16 * MiB
    with path.open("wb") as f:
        f.write(head)
        left = size - len(head)
        while left > 0:
            chunk = os.urandom(min(block, left))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    digest_path.write_text(h.hexdigest())
    return path, h.hexdigest()


def _starts_with(path: Path, head: bytes) -> bool:
    with path.open("rb") as f:
        return f.read(len(head)) == head


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def warm_page_cache(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(16 * MiB):
            pass


# --------------------------------------------------------------------------- nginx


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000;
    keepalive_timeout 60s;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location /throttled/ {{
            alias {root}/;
            limit_rate {limit_rate};
        }}
    }}
}}
"""


@contextlib.contextmanager
def run_nginx(root: Path, *, limit_rate: str = "16m") -> Iterator[str]:
    """nginx from the distribution on 127.0.0.1:<free port> serving `root` (sendfile on);
    `/throttled/NAME` is the same file at `limit_rate` per connection. Yields the base URL."""
    exe = which("nginx")
    if exe is None:
        raise RuntimeError("nginx is missing: apt-get install nginx (make bench does)")
    run_dir = WORK / "nginx"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    port = free_port()
    conf = run_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=os.cpu_count() or 1, dir=run_dir, port=port,
                                      root=root, limit_rate=limit_rate))
    proc = subprocess.Popen([exe, "-c", str(conf), "-p", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"nginx did not start: {err}") from None
                time.sleep(0.02)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- modeld


def catalog_entry(model_id: str, url: str, *, sha256: str | None = None,
                  size: int | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": model_id, "name": model_id, "url": url,
                             "model_type": "llama"}
    if sha256 is not None:
        entry["sha256"] = sha256
    if size is not None:
        entry["size"] = size
    return entry


@contextlib.contextmanager
def run_daemon(name: str, models: list[dict[str, Any]], *,
               prepare: Callable[[Path], None] | None = None,
               **sections: dict[str, Any]) -> Iterator[Daemon]:
    """A real modeld (tests/daemon.py) in WORK/<name>, started fresh, stopped with SIGTERM.
    `prepare(storage_dir)` runs before the start (e.g. to place model files)."""
    tmp = WORK / name
    shutil.rmtree(tmp, ignore_errors=True)
    daemon = Daemon(tmp, models, **sections)
    if prepare is not None:
        prepare(daemon.storage)
    daemon.start(timeout=60)
    try:
        yield daemon
    finally:
        try:
            daemon.stop(timeout=60)
        except Exception:
            daemon.close()


def daemon_pid(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return daemon.proc.pid


def tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants (bytes)."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def client(daemon: Daemon, timeout: float = 120.0) -> httpx.Client:
    return httpx.Client(base_url=daemon.url, timeout=timeout, trust_env=False)


def post_ok(http: httpx.Client, path: str) -> dict[str, Any]:
    response = http.post(path)
    if response.status_code >= 300:
        raise RuntimeError(f"POST {path}: {response.status_code} {response.text}")
    return response.json() if response.content else {}


def delete_model(http: httpx.Client, model_id: str) -> None:
    """POST /models/{id}/delete; tolerates a dropped connection (see BENCHMARKS.md: the 204
    reply currently fails inside quart-trio 0.12 after the files are deleted) by checking that
    the model is absent afterwards."""
    try:
        post_ok(http, f"/models/{model_id}/delete")
    except httpx.RemoteProtocolError:
        wait_state(http, model_id, "downloaded", False, timeout=30)
        wait_state(http, model_id, "downloading", False, timeout=30)


def wait_state(http: httpx.Client, model_id: str, key: str, value: Any,
               timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = http.get(f"/model/{model_id}").json()
        if body.get(key) == value:
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"{model_id}: {key} != {value!r}: {body}")
        time.sleep(0.01)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


__all__ = ["ROOT"]
