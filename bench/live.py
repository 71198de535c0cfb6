"""Benchmarks 3 and 4: the event loop while downloads run (request latency), and progress
fan-out to many WebSocket subscribers."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import httpx
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from bench.common import (
    ROUNDS,
    GiB,
    MiB,
    Result,
    Row,
    catalog_entry,
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
                    f" ({len(busy)} requests)")
    idle50 = median([p[0] for p in idle_p])
    idle99 = median([p[1] for p in idle_p])
    busy50 = median([p[0] for p in busy_p])
    busy99 = median([p[1] for p in busy_p])
    return Result("latency", "Event-loop responsiveness", [
        Row("3. GET /model/{id} p99 while 4 downloads run at full speed",
            f"p50 {busy50:.1f} ms, p99 {busy99:.1f} ms",
            f"idle daemon: p50 {idle50:.1f} ms, p99 {idle99:.1f} ms",
            f"p99 {busy99:.1f} ms ({busy99 / idle99:.1f} x idle)", "p99 < 25 ms", busy99 < 25),
    ], {"size": size, "idle_p50_p99": idle_p, "busy_p50_p99": busy_p,
        "busy_requests": busy_counts})


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


def bench_fanout() -> Result:
    """1000 WebSocket subscribers on one download: terminal for all, <= 10 msg/s each, daemon
    memory, and the download's slowdown against no subscribers."""
    n = env_int("BENCH_FANOUT_SUBSCRIBERS", 1000)
    size = env_int("BENCH_FANOUT_BYTES", 512 * MiB)
    limit = os.environ.get("BENCH_FANOUT_LIMIT_RATE", "0")  # nginx: 0 = unthrottled
    nofile = raise_nofile()
    if nofile < 2 * n + 200:
        raise RuntimeError(f"open files limit {nofile} is too low for {n} subscribers")
    path, digest = random_file(f"download-{size}.gguf", size)
    warm_page_cache(path)
    base_s: list[float] = []
    fan_s: list[float] = []
    growth: list[int] = []
    base_growth: list[int] = []
    rounds: list[dict[str, Any]] = []
    with run_nginx(path.parent, limit_rate=limit) as origin:
        url = f"{origin}/{path.name}" if limit == "0" else f"{origin}/throttled/{path.name}"
        with run_daemon("fanout", [catalog_entry("fan", url, sha256=digest, size=size)]
                        ) as daemon, httpx.Client(base_url=daemon.url, timeout=60,
                                                  trust_env=False) as http:
            pid = daemon_pid(daemon)
            # Growth is against the fresh daemon: an allocator keeps what the first round took,
            # so growth measured per round would hide it from later rounds.
            start_rss = tree_rss(pid)
            for r in range(ROUNDS):
                for who in ("none", "fan") if r % 2 == 0 else ("fan", "none"):
                    before = start_rss
                    with _RssSampler(pid) as sampler:
                        info = trio.run(_fanout_round, daemon.url, "fan", 0 if who == "none"
                                        else n)
                    if info["final"] != "COMPLETED":
                        raise RuntimeError(f"fan-out download ended with {info}")
                    if who == "none":
                        base_s.append(info["seconds"])
                        base_growth.append(sampler.peak - before)
                    else:
                        fan_s.append(info["seconds"])
                        growth.append(sampler.peak - before)
                        rounds.append(info)
                    delete_model(http, "fan")
                    os.sync()
                    log(f"fanout round {r} {who}: {info['seconds']:.2f} s, rss +"
                        f"{(sampler.peak - before) / 1e6:.1f} MB, {info}")
    slowdown = median(fan_s) / median(base_s) - 1
    worst_rate = max(i["max_rate"] for i in rounds)
    got_all = min(i["terminal"] for i in rounds)
    closed = min(i["closed_1000"] for i in rounds)
    grow = float(max(growth))
    return Result("fanout", "Progress fan-out", [
        Row(f"4. {n} WebSocket subscribers on one download ({size / GiB:.2g} GiB, "
            f"{'full speed' if limit == '0' else f'8 x {limit}/s'}): slowdown",
            f"{median(fan_s):.2f} s", f"no subscribers: {median(base_s):.2f} s",
            f"{slowdown * 100:+.1f} %", "< 10 %", slowdown < 0.10),
        Row("4. fan-out: daemon RSS growth (highest peak above the fresh daemon)",
            mb(grow), f"no subscribers: {mb(float(max(base_growth)))}",
            mb(grow), "< 50 MB", grow < 50e6),
        Row("4. fan-out: subscribers that got COMPLETED + close 1000; max rate",
            f"{got_all}/{n} COMPLETED, {closed}/{n} closed 1000",
            "-", f"max {worst_rate:.1f} msg/s per subscriber",
            "all; <= 10/s", got_all == n and closed == n and worst_rate <= 10.5),
    ], {"subscribers": n, "size": size, "limit_rate": limit, "baseline_seconds": base_s,
        "fanout_seconds": fan_s, "rss_growth": growth, "baseline_rss_growth": base_growth,
        "rounds": rounds})
