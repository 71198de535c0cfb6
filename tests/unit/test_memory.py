"""The memory estimate from a header's shape, the choice of idle models to unload, and the
probe's test override (actors/memory.py)."""

from __future__ import annotations

import pytest

from actors.memory import (
    BASE_BYTES,
    COMPUTE_PER_EMBD,
    MEMORY_MARGIN,
    TEST_AVAILABLE_ENV,
    available_memory,
    estimate_memory,
    plan_admission,
    shape_of,
)
from actors.runtimes import CTRANSFORMERS, LLAMA_CPP

MiB = 1024 * 1024
# Gemma 3 270M's header: 18 layers, 640 wide, 4 heads and 1 KV head of 256 values each.
GEMMA = shape_of(tensor_bytes=240 * MiB, layers=18, embedding=640, heads=4, heads_kv=1,
                 key_length=256, value_length=256, vocab=262144)


def test_shape_defaults_follow_llama_cpp() -> None:
    # No KV heads: as many as heads; no key/value length: embedding / heads.
    shape = shape_of(1000, layers=2, embedding=64, heads=4, heads_kv=None, key_length=None,
                     value_length=None, vocab=260)
    assert 4 * (16 + 16) == shape.kv_width
    assert 2 * 256 == GEMMA.kv_width
    empty = shape_of(10, None, None, None, None, None, None, None)
    assert (0, 0, 0) == (empty.layers, empty.kv_width, empty.vocab)


def test_estimate_adds_weights_kv_cache_compute_and_process() -> None:
    est = estimate_memory(GEMMA, LLAMA_CPP, context=4096, parallel=2)
    assert 240 * MiB == est.weights
    assert 4096 * 18 * 512 * 2 == est.kv_cache  # f16 K and V, every layer
    assert 640 * COMPUTE_PER_EMBD + 262144 * 4 * 2 == est.compute  # logits per slot
    assert BASE_BYTES[LLAMA_CPP] == est.process
    assert est.weights + est.kv_cache + est.compute + est.process == est.total
    # The KV cache grows with the context; llama.cpp's slots share it.
    bigger = estimate_memory(GEMMA, LLAMA_CPP, context=8192, parallel=2)
    assert 2 * est.kv_cache == bigger.kv_cache
    assert est.kv_cache == estimate_memory(GEMMA, LLAMA_CPP, context=4096, parallel=4).kv_cache


def test_ctransformers_has_no_separate_compute_buffer() -> None:
    est = estimate_memory(GEMMA, CTRANSFORMERS, context=512, parallel=1)
    assert (0, BASE_BYTES[CTRANSFORMERS]) == (est.compute, est.process)


def test_plan_unloads_the_fewest_least_recently_used() -> None:
    idle = [("old", 300), ("mid", 300), ("new", 300)]
    assert [] == plan_admission(100, MEMORY_MARGIN + 100, idle)
    assert ["old"] == plan_admission(400, MEMORY_MARGIN + 100, idle)
    assert ["old", "mid"] == plan_admission(600, MEMORY_MARGIN + 100, idle)
    assert plan_admission(2000, MEMORY_MARGIN + 100, idle) is None  # all of them: not enough
    assert plan_admission(1, MEMORY_MARGIN - 1, []) is None  # the margin is kept free


def test_the_test_override_counts_only_what_it_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEST_AVAILABLE_ENV, str(123 * MiB))
    assert 123 * MiB == available_memory()  # no workers here
    monkeypatch.delenv(TEST_AVAILABLE_ENV)
    assert 0 < available_memory()
