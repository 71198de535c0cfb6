"""Benchmarks 3 and 4: the event loop while downloads run (request latency), and progress
fan-out to many WebSocket subscribers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from bench.common import (
    ROUNDS,
    GiB,
    MiB,
    Result,
    Row,
    catalog_entry,
    cpu_ticks,
    daemon_pid,
    delete_model,
    env_int,
    log,
    mb,
    median,
    percentile,
    post_ok,
    raise_nofile,
    random_file,
    run_daemon,
    run_nginx,
    steal_share,
    tree_rss,
    warm_page_cache,
)
from bench.ws import TERMINAL, follow, ws_url


def _latencies(http: httpx.Client, path: str, n: int, until: Any = None) -> list[float]:
    """Milliseconds of up to n sequential GETs (stops early when until() is true)."""
    out: list[float] = []
    for _ in range(n):
        if until is not None and until():
            break
        started = time.perf_counter()
        response = http.get(path)
        out.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return out


# A process that does nothing but sleep 2 ms at a time and note how late it wakes up: the
# machine's own stalls, under any process's latency (stdin closed: stop, print the delays in
# ms and the seconds it ran, as JSON).
_SLEEPER = """
import json, select, sys, time
late, started = [], time.perf_counter()
while not select.select([sys.stdin], [], [], 0)[0]:
    t = time.perf_counter()
    time.sleep(0.002)
    late.append((time.perf_counter() - t - 0.002) * 1000)
print(json.dumps({"late": late, "seconds": time.perf_counter() - started}))
"""


def arrival_delay(late_ms: list[float], seconds: float, share: float = 0.01) -> float:
    """The delay (ms) that a request arriving at a random moment exceeds with probability
    `share`, from the stalls a sleeper saw: one arriving inside a stall of L ms waits for the
    rest of it, so P(wait > x) = sum(max(0, L - x)) / the time observed."""
    total_ms = seconds * 1000
    low, high = 0.0, max(late_ms, default=0.0)
    for _ in range(50):
        mid = (low + high) / 2
        if sum(max(0.0, late - mid) for late in late_ms) / total_ms > share:
            low = mid
        else:
            high = mid
    return high


@contextlib.contextmanager
def _machine_delays(out: dict[str, float]) -> Iterator[None]:
    """While the block runs, a sleeper process (above): the delay a request arriving at a
    random moment exceeds 1 % of the time because the machine stalled (out["stall_p99"]),
    the stalls of 10 ms or more per second and their median length, and the share of CPU
    time the hypervisor took (steal, out["steal"], 0..1)."""
    sleeper = subprocess.Popen([sys.executable, "-c", _SLEEPER], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    before = cpu_ticks()
    try:
        yield
    finally:
        after = cpu_ticks()
        output, _ = sleeper.communicate("", timeout=30)
        seen = json.loads(output)
        stalls = [late for late in seen["late"] if late >= 10]
        out["stall_p99"] = arrival_delay(seen["late"], seen["seconds"])
        out["stalls_per_s"] = len(stalls) / seen["seconds"]
        out["stall_p50"] = median(stalls) if stalls else 0.0
        out["steal"] = steal_share(before, after)


def bench_latency() -> Result:
    """p50/p99 of GET /model/{id} while 4 downloads run at full speed, against idle."""
    size = env_int("BENCH_LATENCY_BYTES", 1024 * MiB)
    n_requests = env_int("BENCH_LATENCY_REQUESTS", 300)
    path, digest = random_file(f"download-{size}.gguf", size)
    warm_page_cache(path)
    ids = [f"load{i}" for i in range(4)]
    idle_p: list[tuple[float, float]] = []
    busy_p: list[tuple[float, float]] = []
    busy_counts: list[int] = []
    machine: list[dict[str, float]] = []
    with run_nginx(path.parent) as base:
        url = f"{base}/{path.name}"
        models = [catalog_entry(i, url, sha256=digest, size=size) for i in ids]
        models.append(catalog_entry("probe", url, sha256=digest, size=size))
        with run_daemon("latency", models) as daemon, httpx.Client(
                base_url=daemon.url, timeout=30, trust_env=False) as http:
            published = [daemon.storage / "models" / f"{i}.gguf" for i in ids]
            _latencies(http, "/model/probe", 50)  # warm-up: connection, caches
            for r in range(ROUNDS):
                idle = _latencies(http, "/model/probe", n_requests)
                idle_p.append((percentile(idle, 50), percentile(idle, 99)))
                for i in ids:
                    post_ok(http, f"/model/{i}/download")
                time.sleep(0.2)  # connections open, bytes flowing
                machine.append({})
                with _machine_delays(machine[-1]):
                    busy = _latencies(http, "/model/probe", 100_000,
                                      until=lambda: any(p.exists() for p in published))
                busy_p.append((percentile(busy, 50), percentile(busy, 99)))
                busy_counts.append(len(busy))
                trio.run(_wait_all, daemon.url, ids)
                for i in ids:
                    delete_model(http, i)
                os.sync()
                log(f"latency round {r}: idle p50 {idle_p[-1][0]:.1f} p99 {idle_p[-1][1]:.1f} ms;"
                    f" 4 downloads p50 {busy_p[-1][0]:.1f} p99 {busy_p[-1][1]:.1f} ms"
                    f" ({len(busy)} requests); machine stalls: {machine[-1]}")
    idle50 = median([p[0] for p in idle_p])
    idle99 = median([p[1] for p in idle_p])
    busy50 = median([p[0] for p in busy_p])
    busy99 = median([p[1] for p in busy_p])
    stall99 = median([m["stall_p99"] for m in machine])
    stalls = median([m["stalls_per_s"] for m in machine])
    stall50 = median([m["stall_p50"] for m in machine])
    steal = median([m["steal"] for m in machine])
    return Result("latency", "Event-loop responsiveness", [
        Row("3. GET /model/{id} p99 while 4 downloads run at full speed",
            f"p50 {busy50:.1f} ms, p99 {busy99:.1f} ms",
            f"idle daemon: p50 {idle50:.1f} ms, p99 {idle99:.1f} ms; meanwhile the machine "
            f"stalled a process that only sleeps {stalls:.1f} times a second for {stall50:.0f} "
            f"ms (median), so a request arriving at a random moment waits {stall99:.1f} ms "
            f"or more 1 % of the time whatever serves it; the hypervisor took {steal:.0%} of "
            f"the CPU time (steal)",
            f"p99 {busy99:.1f} ms ({busy99 / idle99:.1f} x idle)", "p99 < 25 ms", busy99 < 25),
    ], {"size": size, "idle_p50_p99": idle_p, "busy_p50_p99": busy_p,
        "busy_requests": busy_counts, "machine": machine})


async def _wait_all(base: str, ids: list[str]) -> None:
    async with trio.open_nursery() as nursery:
        for i in ids:
            nursery.start_soon(follow, base, i)


# --------------------------------------------------------------------------- fan-out


class _Subscriber:
    __slots__ = ("close_code", "final", "times")

    def __init__(self) -> None:
        self.times: list[float] = []
        self.final: str | None = None
        self.close_code: int | None = None


async def _subscribe(url: str, sub: _Subscriber, limiter: trio.CapacityLimiter,
                     connected: list[float]) -> None:
    async with limiter:
        ws_cm = open_websocket_url(url, max_message_size=1 << 20)
        ws = await ws_cm.__aenter__()
    connected[0] += 1
    if connected[0] == connected[1]:
        connected[2] = time.perf_counter()
    try:
        while True:
            message = json.loads(await ws.get_message())
            sub.times.append(time.perf_counter())
            if message.get("status") in TERMINAL:
                sub.final = message["status"]
    except ConnectionClosed as exc:
        sub.close_code = exc.reason.code if exc.reason is not None else None
    finally:
        await ws_cm.__aexit__(None, None, None)


async def _fanout_round(base: str, model_id: str, n: int) -> dict[str, Any]:
    url = ws_url(base, model_id)
    subs = [_Subscriber() for _ in range(n)]
    timer = _Subscriber()
    connected: list[float] = [0, n, 0.0]  # count, wanted, when all were connected
    async with httpx.AsyncClient(base_url=base, timeout=60, trust_env=False) as http:
        started = time.perf_counter()
        (await http.post(f"/model/{model_id}/download")).raise_for_status()
        limiter = trio.CapacityLimiter(64)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_subscribe, url, timer, trio.CapacityLimiter(1), [0, 1, 0.0])
            for sub in subs:
                nursery.start_soon(_subscribe, url, sub, limiter, connected)
        all_connected = connected[2] - started if n and connected[0] == n else None
        seconds = (timer.times[-1] if timer.times else time.perf_counter()) - started
    rates = []
    gaps = []
    for sub in subs:
        if len(sub.times) >= 3:
            span = sub.times[-1] - sub.times[0]
            # messages after the first snapshot, over the time they took
            rates.append((len(sub.times) - 1) / span if span > 0 else float("inf"))
            gaps.append(min(b - a for a, b in zip(sub.times, sub.times[1:], strict=False)))
    return {
        "seconds": seconds,
        "final": timer.final,
        "terminal": sum(1 for s in subs if s.final == "COMPLETED"),
        "closed_1000": sum(1 for s in subs if s.close_code == 1000),
        "all_connected_after": all_connected,
        "max_rate": max(rates) if rates else 0.0,
        "messages": sum(len(s.times) for s in subs),
        "min_gap_ms": min(gaps) * 1000 if gaps else None,
    }


class _RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(0.05)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children."""
    total = 0.0
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def _fanout_series(path: Path, digest: str, size: int, n: int, limit: str) -> dict[str, Any]:
    """Alternating rounds of one download with n subscribers and with none."""
    out: dict[str, Any] = {"none_s": [], "fan_s": [], "none_peak": [], "fan_peak": [],
                           "fan_daemon_cpu": [], "none_daemon_cpu": [], "fan_client_cpu": [],
                           "rounds": []}
    with run_nginx(path.parent, limit_rate=limit) as origin:
        url = f"{origin}/{path.name}" if limit == "0" else f"{origin}/throttled/{path.name}"
        with run_daemon("fanout", [catalog_entry("fan", url, sha256=digest, size=size)]
                        ) as daemon, httpx.Client(base_url=daemon.url, timeout=60,
                                                  trust_env=False) as http:
            pid = daemon_pid(daemon)
            # Peaks are against the fresh daemon: an allocator keeps what a round took, so
            # growth measured per round would hide it from later rounds.
            out["start_rss"] = start_rss = tree_rss(pid)
            for r in range(ROUNDS):
                for who in ("none", "fan") if r % 2 == 0 else ("fan", "none"):
                    cpu_before, client_before = _cpu_seconds(pid), time.process_time()
                    with _RssSampler(pid) as sampler:
                        info = trio.run(_fanout_round, daemon.url, "fan", 0 if who == "none"
                                        else n)
                    # the pump child has exited by now: its CPU time is in children_*
                    info["daemon_cpu"] = _cpu_seconds(pid) - cpu_before
                    info["client_cpu"] = time.process_time() - client_before
                    info["peak"] = sampler.peak - start_rss
                    if info["final"] != "COMPLETED":
                        raise RuntimeError(f"fan-out download ended with {info}")
                    out[f"{who}_s"].append(info["seconds"])
                    out[f"{who}_peak"].append(info["peak"])
                    out[f"{who}_daemon_cpu"].append(info["daemon_cpu"])
                    if who == "fan":
                        out["fan_client_cpu"].append(info["client_cpu"])
                        out["rounds"].append(info)
                    delete_model(http, "fan")
                    os.sync()
                    log(f"fanout ({limit}) round {r} {who}: {info['seconds']:.2f} s, peak +"
                        f"{info['peak'] / 1e6:.1f} MB, daemon cpu {info['daemon_cpu']:.2f} s, "
                        f"client cpu {info['client_cpu']:.2f} s, {info}")
    return out


def bench_fanout() -> Result:
    """1000 WebSocket subscribers on one download: terminal for all, <= 10 msg/s each, the
    memory they cost, and the download's slowdown against no subscribers (at full speed, and
    with a throttled origin)."""
    n = env_int("BENCH_FANOUT_SUBSCRIBERS", 1000)
    size = env_int("BENCH_FANOUT_BYTES", 512 * MiB)
    limit = os.environ.get("BENCH_FANOUT_LIMIT_RATE", "16m")  # nginx, per connection
    nofile = raise_nofile()
    if nofile < 2 * n + 200:
        raise RuntimeError(f"open files limit {nofile} is too low for {n} subscribers")
    path, digest = random_file(f"download-{size}.gguf", size)
    warm_page_cache(path)
    full = _fanout_series(path, digest, size, n, "0")
    slow = _fanout_series(path, digest, size, n, limit)

    def slowdown(series: dict[str, Any]) -> float:
        return float(median(series["fan_s"]) / median(series["none_s"]) - 1)

    # The first round without subscribers runs first, on the fresh daemon: its peak is the
    # download's own memory (the pump process included), before any subscriber.
    download_mem = float(full["none_peak"][0])
    fan_mem = float(max(full["fan_peak"]))
    cost = fan_mem - download_mem
    rounds = full["rounds"] + slow["rounds"]
    worst_rate = max(i["max_rate"] for i in rounds)
    got_all = min(i["terminal"] for i in rounds)
    closed = min(i["closed_1000"] for i in rounds)
    extra_cpu = median(full["fan_daemon_cpu"]) - median(full["none_daemon_cpu"])
    client_cpu = median(full["fan_client_cpu"])
    cores = os.cpu_count() or 1
    # CPU the handshakes need, over what the machine has while the download runs alone
    demand = (extra_cpu + client_cpu) / (cores * median(full["none_s"]))
    return Result("fanout", "Progress fan-out", [
        Row(f"4. {n} WebSocket subscribers joining one download ({size / GiB:.2g} GiB, full "
            "speed): slowdown",
            f"{median(full['fan_s']):.2f} s",
            f"no subscribers: {median(full['none_s']):.2f} s; the {n} handshakes took "
            f"{extra_cpu:.2f} CPU-s in modeld and {client_cpu:.2f} in the client: "
            f"{demand:.1f} x what the {cores} cores have in the download's "
            f"{median(full['none_s']):.2f} s",
            f"{slowdown(full) * 100:+.1f} %", "< 10 %", slowdown(full) < 0.10),
        Row(f"4. the same, origin at 8 x {limit}/s (the download leaves CPU free)",
            f"{median(slow['fan_s']):.2f} s", f"no subscribers: {median(slow['none_s']):.2f} s",
            f"{slowdown(slow) * 100:+.1f} %", "< 10 %", slowdown(slow) < 0.10),
        Row(f"4. fan-out: memory of {n} subscribers (daemon + children RSS peak with them, "
            "minus the same download's peak without them)",
            mb(cost), f"peak above the fresh daemon: {mb(fan_mem)} with them, "
            f"{mb(download_mem)} without", mb(cost), "< 50 MB", cost < 50e6),
        Row("4. fan-out: subscribers that got COMPLETED + close 1000; max rate",
            f"{got_all}/{n} COMPLETED, {closed}/{n} closed 1000",
            "-", f"max {worst_rate:.1f} msg/s per subscriber",
            "all; <= 10/s", got_all == n and closed == n and worst_rate <= 10.5),
    ], {"subscribers": n, "size": size, "limit_rate": limit, "full_speed": full,
        "throttled": slow})
