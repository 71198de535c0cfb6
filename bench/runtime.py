"""Benchmarks 6, 7 and 8: load overhead against direct ctransformers, memory returned after
unloads, and start-up time and idle memory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import (
    FILES,
    ROOT,
    WORK,
    Result,
    Row,
    catalog_entry,
    daemon_pid,
    env_int,
    free_port,
    log,
    mb,
    median,
    post_ok,
    run_daemon,
    tree_rss,
    warm_page_cache,
)
from tests.daemon import Daemon, toml_text
from tests.gguf_factory import write_tiny_llama

THREADS = 1  # the daemon's [runtime] threads in tests/daemon.py, and the reference's
NOWHERE = "http://127.0.0.1:9/never.gguf"  # catalog url of models placed on disk


def gguf_file(extra_bytes: int) -> Path:
    FILES.mkdir(parents=True, exist_ok=True)
    path = FILES / f"tiny-{extra_bytes}.gguf"
    if not path.exists():
        log(f"writing {path}")
        tmp = path.with_suffix(".tmp")
        write_tiny_llama(tmp, extra_bytes=extra_bytes)
        tmp.rename(path)
    return path


def _placed(models: dict[str, Path]) -> tuple[list[dict[str, Any]], Any]:
    """Catalog entries for files put into the storage dir before start (hard links)."""
    # runtime = ctransformers: these rows compare with ctransformers loading in-process.
    entries = [{**catalog_entry(i, NOWHERE, size=p.stat().st_size), "runtime": "ctransformers"}
               for i, p in models.items()]

    def place(storage: Path) -> None:
        (storage / "models").mkdir(parents=True, exist_ok=True)
        for model_id, path in models.items():
            target = storage / "models" / f"{model_id}.gguf"
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)

    return entries, place


class _Direct:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.direct"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("bench.direct did not start")

    def load(self, path: Path, context_length: int) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{path} {context_length} {THREADS}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _wait_no_workers(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while psutil.Process(pid).children(recursive=True):
        if time.monotonic() > deadline:
            raise TimeoutError("a worker process outlived its unload")
        time.sleep(0.01)


def bench_load() -> Result:
    rounds = env_int("BENCH_LOAD_ROUNDS", 5)
    big_extra = env_int("BENCH_BIG_MODEL_EXTRA_BYTES", 400_000_000)
    files = {"tiny": gguf_file(0), "big": gguf_file(big_extra)}
    for p in files.values():
        warm_page_cache(p)
    entries, place = _placed(files)
    rows = []
    details: dict[str, Any] = {}
    direct = _Direct()
    try:
        with run_daemon("load", entries, prepare=place) as daemon, \
                httpx.Client(base_url=daemon.url, timeout=300, trust_env=False) as http:
            pid = daemon_pid(daemon)
            for model_id, path in files.items():
                modeld_s: list[float] = []
                direct_s: list[float] = []
                for r in range(rounds):
                    for who in ("modeld", "direct") if r % 2 == 0 else ("direct", "modeld"):
                        if who == "modeld":
                            started = time.perf_counter()
                            body = post_ok(http, f"/model/{model_id}/load")
                            modeld_s.append(time.perf_counter() - started)
                            assert body.get("loaded") is True, body
                            post_ok(http, f"/model/{model_id}/unload")
                            _wait_no_workers(pid)
                        else:
                            direct_s.append(direct.load(path, 128))
                log(f"load {model_id}: modeld {modeld_s}, direct {direct_s}")
                extra_ms = (median(modeld_s) - median(direct_s)) * 1000
                size = path.stat().st_size
                rows.append(Row(
                    f"6. POST /model/{{id}}/load, {mb(size)} GGUF (worker spawn included)",
                    f"{median(modeld_s) * 1000:.0f} ms",
                    f"ctransformers in-process: {median(direct_s) * 1000:.0f} ms",
                    f"+{extra_ms:.0f} ms", "< 300 ms extra", extra_ms < 300))
                details[model_id] = {"bytes": size, "modeld_seconds": modeld_s,
                                     "direct_seconds": direct_s}
            details["daemon_log"] = [
                {k: line.get(k) for k in ("model", "load_seconds", "runtime_load_seconds")}
                for line in daemon.events("model_loaded")]
    finally:
        direct.close()
    return Result("load", "Load overhead", rows, details)


def memory_cycles(daemon: Daemon, http: httpx.Client, model_id: str, cycles: int,
                  while_loaded: Callable[[], object] = lambda: None,
                  ) -> tuple[int, list[int], list[int]]:
    """Daemon + worker RSS before any load, then with the model loaded and after its unload,
    for each of `cycles` load/unload cycles (`while_loaded` runs between load and unload)."""
    pid = daemon_pid(daemon)
    for _ in range(20):  # same requests as a cycle, without a load: warm the code paths
        http.get(f"/model/{model_id}").raise_for_status()
        http.get("/models").raise_for_status()
    time.sleep(0.5)
    baseline = tree_rss(pid)
    loaded: list[int] = []
    after: list[int] = []
    for i in range(cycles):
        post_ok(http, f"/model/{model_id}/load")
        while_loaded()
        loaded.append(tree_rss(pid))
        post_ok(http, f"/model/{model_id}/unload")
        _wait_no_workers(pid)
        time.sleep(0.2)
        after.append(tree_rss(pid))
        log(f"memory cycle {i} ({model_id}): loaded {mb(loaded[-1])}, after unload "
            f"{mb(after[-1])} (baseline {mb(baseline)})")
    return baseline, loaded, after


def bench_memory() -> Result:
    cycles = env_int("BENCH_MEMORY_CYCLES", 20)
    big_extra = env_int("BENCH_BIG_MODEL_EXTRA_BYTES", 400_000_000)
    path = gguf_file(big_extra)
    warm_page_cache(path)
    entries, place = _placed({"big": path})
    with run_daemon("memory", entries, prepare=place) as daemon, \
            httpx.Client(base_url=daemon.url, timeout=300, trust_env=False) as http:
        baseline, loaded, after = memory_cycles(daemon, http, "big", cycles)
    worst = max(a - baseline for a in after)
    last = after[-1] - baseline
    loaded_f = [float(x) for x in loaded]
    return Result("memory", "Memory return", [
        Row(f"7. {cycles} load/unload cycles of a {mb(path.stat().st_size)} model: daemon + "
            "worker RSS after unload",
            f"worst {mb(worst)} above, last {mb(last)} above",
            f"before the first load: {mb(baseline)} (loaded: {mb(median(loaded_f))})",
            f"{worst / 1e6:+.1f} MB", "within 10 MB", abs(worst) <= 10e6),
    ], {"baseline": baseline, "after_unload": after, "loaded": loaded})


# --------------------------------------------------------------------------- start-up


def _startup_once(config: Path, storage: Path, port: int) -> dict[str, float]:
    sock_path = WORK / "notify.sock"
    sock_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(60)
    ready: dict[str, float] = {}

    def read_notify() -> None:
        while "ready" not in ready:
            try:
                data = notify.recv(4096)
            except OSError:
                return
            if b"READY=1" in data.split(b"\n"):
                ready["ready"] = time.perf_counter()

    env = {k: v for k, v in os.environ.items()
           if k not in ("STATE_DIRECTORY", "LISTEN_FDS", "LISTEN_PID")}
    env["NOTIFY_SOCKET"] = str(sock_path)
    reader = threading.Thread(target=read_notify, daemon=True)
    reader.start()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "serve", "--config", str(config)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        first_200 = None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5,
                          trust_env=False) as http:
            deadline = started + 60
            while first_200 is None:
                try:
                    response = http.get("/models")
                    if response.status_code == 200:
                        first_200 = time.perf_counter()
                        assert len(response.json()["iterable"]) >= 100
                except httpx.TransportError:
                    time.sleep(0.002)
                if time.perf_counter() > deadline or proc.poll() is not None:
                    raise RuntimeError("modeld did not answer GET /models")
        reader.join(timeout=10)
        time.sleep(2.0)  # idle
        rss = psutil.Process(proc.pid).memory_info().rss
        return {"ready": ready.get("ready", float("nan")) - started,
                "first_200": first_200 - started, "rss": float(rss)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        notify.close()
        shutil.rmtree(storage, ignore_errors=True)


_IMPORTS = ("import supervisor.cli, supervisor.daemon, supervisor.api.app, supervisor.registry, "
            "os, psutil; print(psutil.Process(os.getpid()).memory_info().rss)")


def _imports_once() -> tuple[float, float]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _IMPORTS], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return time.perf_counter() - started, float(out.stdout.split()[-1])


def bench_startup() -> Result:
    n_models = env_int("BENCH_STARTUP_MODELS", 100)
    rounds = max(3, env_int("BENCH_ROUNDS", 3))
    tmp = WORK / "startup"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    storage = tmp / "storage"
    port = free_port()
    models = [catalog_entry(f"m{i:03d}", f"http://127.0.0.1:9/m{i:03d}.gguf",
                            sha256=f"{i:064x}", size=1_000_000 + i) for i in range(n_models)]
    config = tmp / "config.toml"
    config.write_text(toml_text({
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"dir": str(storage)},
        "download": {"allow_http": True},
        "runtime": {"threads": THREADS},
    }, models))
    _imports_once()  # warm the file cache for both (not counted)
    _startup_once(config, storage, port)
    runs: list[dict[str, float]] = []
    imports: list[tuple[float, float]] = []
    for r in range(rounds):
        if r % 2 == 0:
            runs.append(_startup_once(config, storage, port))
            imports.append(_imports_once())
        else:
            imports.append(_imports_once())
            runs.append(_startup_once(config, storage, port))
        log(f"startup round {r}: {runs[-1]}, imports {imports[-1]}")
    ready = median([x["ready"] for x in runs])
    first = median([x["first_200"] for x in runs])
    rss = median([x["rss"] for x in runs])
    imp_s = median([x[0] for x in imports])
    imp_rss = median([x[1] for x in imports])
    return Result("startup", "Start-up", [
        Row(f"8. start -> READY=1 / first 200 on GET /models ({n_models}-model catalog)",
            f"READY {ready * 1000:.0f} ms, 200 at {first * 1000:.0f} ms",
            f"python importing modeld's modules: {imp_s * 1000:.0f} ms",
            f"{max(ready, first):.2f} s ({max(ready, first) / imp_s:.1f} x imports)", "< 1.5 s",
            max(ready, first) < 1.5),
        Row("8. idle daemon RSS", mb(rss), f"python with modeld's modules imported: {mb(imp_rss)}",
            f"{mb(rss)} ({rss / imp_rss:.2f} x)", "< 80 MB", rss < 80e6),
    ], {"runs": runs, "imports": imports})
