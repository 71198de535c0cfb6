"""The llama.cpp runtime beside ctransformers, and under load: the same llama file on both
backends (load time, tokens/s), parallel slots on Gemma 3 270M (4 clients at once against
the same 4 requests one after another), and memory after load/unload cycles on llama.cpp."""

from __future__ import annotations

import json
import threading
import time

import httpx

from bench.common import (
    Result,
    Row,
    env_int,
    log,
    mb,
    median,
    post_ok,
    run_daemon,
    warm_page_cache,
)
from bench.llamacpp import gemma_path, place_as
from bench.runtime import _placed, gguf_file, memory_cycles

PROMPT = "Once upon a time, in a small village by the sea,"


def stream_tokens(url: str, model_id: str, tokens: int) -> tuple[int, float]:
    """A streamed completion of `tokens` tokens: (pieces received, seconds from the first
    piece to the last)."""
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    stamps: list[float] = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600,
                      trust_env=False) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return len(stamps), stamps[-1] - stamps[0]


def bench_backends() -> Result:
    """One llama file (random F32 weights, 400 MB), each backend through modeld."""
    rounds = env_int("BENCH_ROUNDS", 3)
    tokens = env_int("BENCH_BACKEND_TOKENS", 64)
    path = gguf_file(env_int("BENCH_BIG_MODEL_EXTRA_BYTES", 400_000_000))
    warm_page_cache(path)
    entries, place = _placed({"onllama": path, "onct": path})
    entries[0]["runtime"] = "llama.cpp"
    got: dict[str, list[float]] = {k: [] for k in ("llama_load", "ct_load", "llama_tps",
                                                   "ct_tps")}
    with run_daemon("backends", entries, prepare=place,
                    runtime={"threads": 1, "max_loaded": 1}) as daemon, \
            httpx.Client(base_url=daemon.url, timeout=600, trust_env=False) as http:
        for r in range(rounds):
            order = [("llama", "onllama"), ("ct", "onct")]
            for who, model_id in order if r % 2 == 0 else order[::-1]:
                started = time.perf_counter()
                post_ok(http, f"/model/{model_id}/load")
                got[f"{who}_load"].append(time.perf_counter() - started)
                n, seconds = stream_tokens(daemon.url, model_id, tokens)
                got[f"{who}_tps"].append((n - 1) / seconds)
                post_ok(http, f"/model/{model_id}/unload")
            log(f"backends round {r}: { {k: round(v[-1], 3) for k, v in got.items()} }")
    m = {k: median(v) for k, v in got.items()}
    size = mb(path.stat().st_size)
    return Result("backends", "llama.cpp against ctransformers on one llama file", [
        Row(f"10. the same {size} llama file (F32), POST /model/{{id}}/load",
            f"llama.cpp: {m['llama_load'] * 1000:.0f} ms",
            f"ctransformers: {m['ct_load'] * 1000:.0f} ms",
            f"{m['llama_load'] / m['ct_load']:.2f} x ctransformers", "report", None),
        Row(f"10. the same file, {tokens}-token streamed completion, 1 thread: tokens/s",
            f"llama.cpp: {m['llama_tps']:.1f} tok/s",
            f"ctransformers: {m['ct_tps']:.1f} tok/s",
            f"{m['llama_tps'] / m['ct_tps']:.2f} x ctransformers", "report", None),
    ], {"seconds": got})


def bench_parallel() -> Result:
    """Gemma 3 270M with 4 slots: 4 clients at once against the same 4 requests in a row."""
    rounds = env_int("BENCH_ROUNDS", 3)
    tokens = env_int("BENCH_PARALLEL_TOKENS", 64)
    clients = 4
    path = gemma_path()
    warm_page_cache(path)
    entry = {"id": "gemma", "name": "gemma", "url": "http://127.0.0.1:9/gemma.gguf",
             "context_length": 4096, "parallel": clients}
    got: dict[str, list[float]] = {"together": [], "sequential": []}
    with run_daemon("parallel", [entry], prepare=place_as(path, "gemma"),
                    runtime={"threads": 1, "max_loaded": 1}) as daemon, \
            httpx.Client(base_url=daemon.url, timeout=600, trust_env=False) as http:
        post_ok(http, "/model/gemma/load")
        stream_tokens(daemon.url, "gemma", 8)  # warm
        for r in range(rounds):
            for how in ("together", "sequential") if r % 2 == 0 else ("sequential",
                                                                        "together"):
                counts: list[int] = []
                started = time.perf_counter()
                if how == "sequential":
                    counts = [stream_tokens(daemon.url, "gemma", tokens)[0]
                              for _ in range(clients)]
                else:
                    def one(into: list[int] = counts) -> None:
                        into.append(stream_tokens(daemon.url, "gemma", tokens)[0])

                    threads = [threading.Thread(target=one) for _ in range(clients)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                got[how].append(sum(counts) / (time.perf_counter() - started))
            log(f"parallel round {r}: { {k: round(v[-1], 1) for k, v in got.items()} }")
    m = {k: median(v) for k, v in got.items()}
    return Result("parallel", "parallel slots on llama.cpp", [
        Row(f"11. Gemma 3 270M, parallel = {clients}: {clients} clients at once, {tokens} "
            "tokens each, 1 thread: aggregate tokens/s",
            f"{m['together']:.1f} tok/s", f"the same {clients} one after another: "
            f"{m['sequential']:.1f} tok/s", f"{m['together'] / m['sequential']:.2f} x",
            "report", None),
    ], {"tokens_per_second": got})


def bench_llamacpp_memory() -> Result:
    """RSS of the daemon and its workers after load/unload cycles of Gemma on llama.cpp."""
    cycles = env_int("BENCH_MEMORY_CYCLES", 10)
    path = gemma_path()
    warm_page_cache(path)
    entry = {"id": "gemma", "name": "gemma", "url": "http://127.0.0.1:9/gemma.gguf",
             "context_length": 4096}
    with run_daemon("llamacpp-memory", [entry], prepare=place_as(path, "gemma"),
                    runtime={"threads": 1, "max_loaded": 1}) as daemon, \
            httpx.Client(base_url=daemon.url, timeout=600, trust_env=False) as http:
        baseline, loaded, after = memory_cycles(
            daemon, http, "gemma", cycles,
            while_loaded=lambda: stream_tokens(daemon.url, "gemma", 8))
    worst = max(a - baseline for a in after)
    return Result("llamacpp-memory", "memory return on llama.cpp", [
        Row(f"9. Gemma 3 270M on llama.cpp, {cycles} load/generate/unload cycles: daemon + "
            "worker RSS after unload",
            f"worst {mb(worst)} above, last {mb(after[-1] - baseline)} above",
            f"before the first load: {mb(baseline)} "
            f"(loaded: {mb(median([float(x) for x in loaded]))})",
            f"{worst / 1e6:+.1f} MB", "within 10 MB", abs(worst) <= 10e6),
    ], {"baseline": baseline, "after_unload": after, "loaded": loaded})

