"""Memory admission: what a model will take once loaded, estimated from its GGUF header, and
which idle models to unload so that it fits.

The estimate is the sum of
- the weights: every tensor's bytes (llama.cpp maps them, ctransformers reads them; either way
  they end up resident once the model generates);
- the KV cache: context tokens x layers x (K + V width) in f16. llama.cpp's slots share one
  cache of the context length; ctransformers has one sequence;
- compute buffers: COMPUTE_PER_EMBD bytes per embedding dimension (llama.cpp's graph for a
  prompt batch grows with the width of the model), plus the logits of each slot;
- the worker process itself (Python, the runtime's libraries): BASE_BYTES per runtime.
The constants were fitted to the resident memory of real workers (bench/estimate.py reports the
estimate against the measurement for Gemma 3 270M and the tiny test model on both runtimes).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import attrs
import psutil

from actors.runtimes import CTRANSFORMERS

MiB = 1024 * 1024
BASE_BYTES = {"llama.cpp": 30 * MiB, CTRANSFORMERS: 20 * MiB}
COMPUTE_PER_EMBD = 64 * 1024  # bytes of compute buffer per embedding dimension (llama.cpp)
KV_BYTES = 2  # f16
# Memory kept free beyond a model's estimate: the daemon, the page cache of what it serves.
MEMORY_MARGIN = 256 * MiB
# For tests only: pretend the machine has this many bytes available (an integer) besides what
# this daemon's model workers take.
TEST_AVAILABLE_ENV = "MODELD_TEST_MEMORY_AVAILABLE"


@attrs.frozen
class MemoryShape:
    """What a GGUF header says about a model's size in memory."""

    tensor_bytes: int
    layers: int
    embedding: int
    kv_width: int  # K and V values per token and layer (heads_kv x (key + value length))
    vocab: int


def shape_of(tensor_bytes: int, layers: int | None, embedding: int | None,
             heads: int | None, heads_kv: int | None, key_length: int | None,
             value_length: int | None, vocab: int | None) -> MemoryShape:
    """A MemoryShape from header fields, with llama.cpp's defaults for the missing ones
    (no KV heads: as many as heads; no key/value length: embedding / heads)."""
    embedding = embedding or 0
    heads = heads or 1
    head_dim = embedding // heads if embedding else 0
    kv_heads = heads_kv or heads
    width = kv_heads * ((key_length or head_dim) + (value_length or head_dim))
    return MemoryShape(tensor_bytes, layers or 0, embedding, width, vocab or 0)


@attrs.frozen
class MemoryEstimate:
    weights: int
    kv_cache: int
    compute: int
    process: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.process


def estimate_memory(shape: MemoryShape, runtime: str, context: int,
                    parallel: int) -> MemoryEstimate:
    """What a worker of `runtime` with `context` tokens and `parallel` slots will take."""
    kv = context * shape.layers * shape.kv_width * KV_BYTES
    if runtime == CTRANSFORMERS:
        compute = 0  # its scratch buffers are part of the measured process base
    else:
        compute = shape.embedding * COMPUTE_PER_EMBD + shape.vocab * 4 * max(1, parallel)
    return MemoryEstimate(weights=shape.tensor_bytes, kv_cache=kv, compute=compute,
                          process=BASE_BYTES.get(runtime, BASE_BYTES["llama.cpp"]))


MemoryProbe = Callable[[], int]


def available_memory() -> int:
    """Bytes the kernel could give a new process without swapping (MemAvailable)."""
    override = os.environ.get(TEST_AVAILABLE_ENV)
    if override is not None:
        return int(override) - _workers_resident()
    return int(psutil.virtual_memory().available)


def resident_bytes(pid: int | None) -> int | None:
    """A worker's resident memory (one small /proc read), or None when it is gone."""
    if pid is None:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def _workers_resident() -> int:
    total = 0
    for child in psutil.Process().children():
        try:
            if "actors.worker_main" in child.cmdline():
                total += resident_bytes(child.pid) or 0
        except psutil.Error:
            continue
    return total


def plan_admission(need: int, available: int,
                   idle: Sequence[tuple[str, int]]) -> list[str] | None:
    """Which idle models (least recently used first, with their resident bytes) to unload so
    that `need` plus MEMORY_MARGIN fits in `available`: the fewest from the front of `idle`;
    None when unloading all of them would not be enough."""
    victims: list[str] = []
    free = available
    for model_id, rss in idle:
        if need + MEMORY_MARGIN <= free:
            break
        victims.append(model_id)
        free += rss
    return victims if need + MEMORY_MARGIN <= free else None


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
