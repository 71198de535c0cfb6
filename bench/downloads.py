"""Benchmarks 1 and 2: download throughput over loopback against curl and aria2c."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx

from bench.common import (
    ROUNDS,
    WORK,
    GiB,
    MiB,
    Result,
    Row,
    catalog_entry,
    delete_model,
    env_float,
    env_int,
    log,
    mbps,
    median,
    random_file,
    rate,
    run_daemon,
    run_nginx,
    warm_page_cache,
    which,
)
from bench.ws import timed_download


def _need(tool: str) -> str:
    exe = which(tool)
    if exe is None:
        raise RuntimeError(f"{tool} is missing: apt-get install {tool} (make bench does)")
    return exe


def _reset(daemon_url: str, model_id: str) -> None:
    with httpx.Client(base_url=daemon_url, timeout=60, trust_env=False) as http:
        delete_model(http, model_id)
    os.sync()  # no writeback from one round bleeds into the next


def _curl(url: str, dest: str, *, max_time: float | None = None) -> tuple[float, int]:
    """(seconds, bytes) of one `curl -o`."""
    cmd = [_need("curl"), "-s", "-o", dest, "-w", "%{size_download} %{time_total}", url]
    if max_time is not None:
        cmd[1:1] = ["--max-time", f"{max_time:g}"]
    started = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if out.returncode not in (0, 28):  # 28: --max-time reached, expected
        raise RuntimeError(f"curl failed ({out.returncode}): {out.stderr}")
    size, _total = out.stdout.split()
    return seconds, int(float(size))


def bench_download() -> Result:
    """1 GiB from nginx (sendfile), modeld (sha256 included) against `curl -o`."""
    size = env_int("BENCH_DOWNLOAD_BYTES", 1 * GiB)
    path, digest = random_file(f"download-{size}.gguf", size)
    warm_page_cache(path)
    out = WORK / "curl-out"
    out.mkdir(parents=True, exist_ok=True)
    modeld_s: list[float] = []
    curl_s: list[float] = []
    with run_nginx(path.parent) as base:
        url = f"{base}/{path.name}"
        models = [catalog_entry("big", url, sha256=digest, size=size)]
        with run_daemon("download", models) as daemon:
            for i in range(ROUNDS):
                # Alternate who goes first, so a slow phase of the machine hits both.
                order = ("modeld", "curl") if i % 2 == 0 else ("curl", "modeld")
                for who in order:
                    if who == "modeld":
                        seconds = timed_download(daemon.url, "big")
                        modeld_s.append(seconds)
                        _reset(daemon.url, "big")
                    else:
                        dest = out / "big.gguf"
                        seconds, got = _curl(url, str(dest))
                        assert got == size, (got, size)
                        curl_s.append(seconds)
                        dest.unlink()
                        os.sync()
                    log(f"download round {i} {who}: {seconds:.2f} s "
                        f"({mbps(rate(size, seconds))})")
    m_rate = rate(size, median(modeld_s))
    c_rate = rate(size, median(curl_s))
    ratio = m_rate / c_rate
    return Result("download", "Download throughput (loopback)", [
        Row(f"1. download {size / GiB:.2g} GiB, nginx sendfile (modeld incl. sha256)",
            mbps(m_rate), f"curl -o: {mbps(c_rate)}", f"{ratio:.2f} x curl", ">= 0.9 x curl",
            ratio >= 0.9),
    ], {"size": size, "modeld_seconds": modeld_s, "curl_seconds": curl_s})


def bench_segmented() -> Result:
    """nginx limit_rate per connection; modeld 8 connections vs aria2c -x8 -s8 vs one curl."""
    size = env_int("BENCH_SEGMENTED_BYTES", 512 * MiB)
    limit = os.environ.get("BENCH_LIMIT_RATE", "16m")
    curl_seconds = env_float("BENCH_SINGLE_CURL_SECONDS", 4.0)
    path, digest = random_file(f"segmented-{size}.gguf", size)
    warm_page_cache(path)
    aria = _need("aria2c")
    out = WORK / "aria-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    modeld_s: list[float] = []
    aria_s: list[float] = []
    single: list[float] = []  # bytes per second
    with run_nginx(path.parent, limit_rate=limit) as base:
        url = f"{base}/throttled/{path.name}"
        models = [catalog_entry("seg", url, sha256=digest, size=size)]
        with run_daemon("segmented", models, download={"connections": 8}) as daemon:
            for i in range(ROUNDS):
                order = ["modeld", "aria2c", "curl"]
                order = order[i % 3:] + order[: i % 3]
                for who in order:
                    if who == "modeld":
                        seconds = timed_download(daemon.url, "seg")
                        modeld_s.append(seconds)
                        _reset(daemon.url, "seg")
                        shown = mbps(rate(size, seconds))
                    elif who == "aria2c":
                        started = time.perf_counter()
                        subprocess.run(
                            [aria, "-x8", "-s8", "-q", "--allow-overwrite=true",
                             "--auto-file-renaming=false", "--file-allocation=falloc",
                             f"--checksum=sha-256={digest}", "-d", str(out), "-o", "seg.gguf",
                             url],
                            check=True)
                        seconds = time.perf_counter() - started
                        aria_s.append(seconds)
                        (out / "seg.gguf").unlink()
                        os.sync()
                        shown = mbps(rate(size, seconds))
                    else:
                        seconds, got = _curl(url, "/dev/null", max_time=curl_seconds)
                        single.append(rate(got, seconds))
                        shown = mbps(single[-1])
                    log(f"segmented round {i} {who}: {seconds:.2f} s ({shown})")
    m_rate = rate(size, median(modeld_s))
    a_rate = rate(size, median(aria_s))
    c_rate = median(single)
    vs_aria = m_rate / a_rate
    vs_curl = m_rate / c_rate
    title = f"2. segmented, {size / MiB:.0f} MiB, nginx limit_rate {limit}/connection"
    return Result("segmented", "Segmented download (throttled origin)", [
        Row(title + ", vs aria2c", mbps(m_rate), f"aria2c -x8 -s8 (sha-256): {mbps(a_rate)}",
            f"{vs_aria:.2f} x aria2c", ">= 0.9 x aria2c", vs_aria >= 0.9),
        Row(title + ", vs one curl", mbps(m_rate), f"single curl: {mbps(c_rate)}",
            f"{vs_curl:.1f} x curl", ">= 6 x curl", vs_curl >= 6),
    ], {"size": size, "limit_rate": limit, "modeld_seconds": modeld_s, "aria2c_seconds": aria_s,
        "single_curl_bytes_per_second": single})

