"""Benchmarks 1 and 2: download throughput over loopback against curl and aria2c."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

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


def _dd(src: str, dest: str) -> float:
    """Seconds of one `dd` copy of the (cached) file to the same disk with direct I/O: how
    fast the disk itself takes 1 GiB, which bounds any download that must be on disk (modeld
    fsyncs before it publishes)."""
    started = time.perf_counter()
    subprocess.run([_need("dd"), f"if={src}", f"of={dest}", "bs=16M", "oflag=direct",
                    "status=none"], check=True)
    return time.perf_counter() - started


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bench_download() -> Result:
    """1 GiB from nginx (sendfile): modeld with and without a sha256, against `curl -o` (the
    file in the page cache), `curl -o` then fsync (on disk, as modeld publishes it) and a
    direct-I/O `dd` to the same disk, in rotating rounds."""
    size = env_int("BENCH_DOWNLOAD_BYTES", 1 * GiB)
    path, digest = random_file(f"download-{size}.gguf", size)
    warm_page_cache(path)
    out = WORK / "curl-out"
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {"modeld": [], "modeld-nosha": [], "curl": [],
                                     "curl+fsync": [], "dd": []}
    with run_nginx(path.parent) as base:
        url = f"{base}/{path.name}"
        models = [catalog_entry("big", url, sha256=digest, size=size),
                  catalog_entry("raw", url, size=size)]
        with run_daemon("download", models) as daemon:
            for i in range(ROUNDS):
                # Rotate who goes first, so a slow phase of the machine hits all.
                order = list(times)
                order = order[i % len(order):] + order[: i % len(order)]
                for who in order:
                    if who.startswith("modeld"):
                        model = "big" if who == "modeld" else "raw"
                        seconds = timed_download(daemon.url, model)
                        _reset(daemon.url, model)
                    else:
                        dest = out / "big.gguf"
                        if who.startswith("curl"):
                            started = time.perf_counter()
                            _seconds, got = _curl(url, str(dest))
                            assert got == size, (got, size)
                            if who == "curl+fsync":
                                _fsync(dest)
                            seconds = time.perf_counter() - started
                        else:
                            seconds = _dd(str(path), str(dest))
                        dest.unlink()
                        os.sync()
                    times[who].append(seconds)
                    log(f"download round {i} {who}: {seconds:.2f} s "
                        f"({mbps(rate(size, seconds))})")
    rates = {who: rate(size, median(s)) for who, s in times.items()}
    c_rate, cs_rate, dd_rate = rates["curl"], rates["curl+fsync"], rates["dd"]
    rows = []
    for who, what in (("modeld", "incl. sha256"), ("modeld-nosha", "no sha256")):
        ratio = rates[who] / c_rate
        rows.append(Row(
            f"1. download {size / GiB:.2g} GiB, nginx sendfile (modeld {what}, fsynced)",
            mbps(rates[who]),
            f"curl -o: {mbps(c_rate)}; curl -o + fsync: {mbps(cs_rate)}; "
            f"dd oflag=direct: {mbps(dd_rate)}",
            f"{ratio:.2f} x curl, {rates[who] / cs_rate:.2f} x curl + fsync, "
            f"{rates[who] / dd_rate:.2f} x dd", ">= 0.9 x curl", ratio >= 0.9))
    return Result("download", "Download throughput (loopback)", rows, {
        "size": size, "modeld_seconds": times["modeld"],
        "modeld_nosha_seconds": times["modeld-nosha"], "curl_seconds": times["curl"],
        "curl_fsync_seconds": times["curl+fsync"], "dd_direct_seconds": times["dd"]})


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

