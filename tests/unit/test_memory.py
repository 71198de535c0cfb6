"""The memory estimate from a GGUF header's shape, and the choice of idle models to unload
(actors/memory.py): pure functions, no daemon, no worker."""

from __future__ import annotations

import pytest

from actors import memory
from actors.memory import (
    BASE_BYTES,
    COMPUTE_PER_EMBD,
    MEMORY_MARGIN,
    TEST_AVAILABLE_ENV,
    MemoryShape,
    available_memory,
    estimate_memory,
    plan_admission,
    shape_of,
)
from actors.runtimes import CTRANSFORMERS, LLAMA_CPP

# Gemma 3 270M's header: 18 layers, 640 wide, 4 heads of 256 (1 KV head), 262144 tokens.
GEMMA = shape_of(tensor_bytes=241_000_000, layers=18, embedding=640, heads=4, heads_kv=1,
                 key_length=256, value_length=256, vocab=262_144)


def test_shape_defaults_follow_llama_cpp() -> None:
    # No KV heads: as many as heads; no key/value length: embedding / heads.
    assert 2 * 64 == shape_of(0, 2, 64, 4, None, None, None, 260).kv_width
    # Grouped-query attention: 8 heads share 2 KV heads of 64 values each.
    assert 2 * (64 + 64) == shape_of(0, 4, 512, 8, 2, None, None, 100).kv_width
    # Explicit key and value lengths win over embedding / heads.
    assert 1 * (256 + 256) == GEMMA.kv_width
    # A header that says nothing about its shape: weights only, no KV cache.
    bare = shape_of(1000, None, None, None, None, None, None, None)
    assert MemoryShape(1000, 0, 0, 0, 0) == bare
    assert 0 == estimate_memory(bare, LLAMA_CPP, 4096, 4).kv_cache


def test_kv_cache_grows_with_context_in_f16() -> None:
    small = estimate_memory(GEMMA, LLAMA_CPP, 1024, 1)
    large = estimate_memory(GEMMA, LLAMA_CPP, 4096, 1)
    assert 1024 * 18 * 512 * 2 == small.kv_cache
    assert 4 * small.kv_cache == large.kv_cache
    assert small.weights == large.weights == 241_000_000


def test_llama_cpp_compute_buffers_grow_with_slots() -> None:
    one = estimate_memory(GEMMA, LLAMA_CPP, 4096, 1)
    four = estimate_memory(GEMMA, LLAMA_CPP, 4096, 4)
    assert 640 * COMPUTE_PER_EMBD + 262_144 * 4 == one.compute
    assert 3 * 262_144 * 4 == four.compute - one.compute  # one more logits row per slot
    assert one.kv_cache == four.kv_cache  # the slots share one cache of the context length
    assert one.weights + one.kv_cache + one.compute + BASE_BYTES[LLAMA_CPP] == one.total


def test_ctransformers_has_no_separate_compute_buffers() -> None:
    estimate = estimate_memory(GEMMA, CTRANSFORMERS, 2048, 1)
    assert 0 == estimate.compute
    assert BASE_BYTES[CTRANSFORMERS] == estimate.process
    assert estimate.total < estimate_memory(GEMMA, LLAMA_CPP, 2048, 1).total


def test_an_unknown_runtime_is_estimated_as_llama_cpp() -> None:
    assert estimate_memory(GEMMA, LLAMA_CPP, 512, 2) == estimate_memory(GEMMA, "other", 512, 2)


IDLE = [("oldest", 300), ("older", 200), ("newest", 500)]  # least recently used first


@pytest.mark.parametrize(
    ("need", "available", "victims"),
    [
        (100, MEMORY_MARGIN + 100, []),  # fits exactly: nothing unloaded
        (101, MEMORY_MARGIN + 100, ["oldest"]),  # the margin is kept free
        (400, MEMORY_MARGIN + 100, ["oldest"]),
        (401, MEMORY_MARGIN + 100, ["oldest", "older"]),  # the fewest, oldest first
        (1100, MEMORY_MARGIN + 100, ["oldest", "older", "newest"]),
        (1101, MEMORY_MARGIN + 100, None),  # even all of them would not be enough
        (100, MEMORY_MARGIN - 200, ["oldest"]),  # short of the margin: eviction makes room
    ],
)
def test_plan_unloads_the_fewest_least_recently_used(need: int, available: int,
                                                     victims: list[str] | None) -> None:
    assert victims == plan_admission(need, available, IDLE)


def test_plan_with_nothing_idle() -> None:
    assert [] == plan_admission(1, MEMORY_MARGIN + 1, [])
    assert plan_admission(2, MEMORY_MARGIN + 1, []) is None


def test_available_memory_from_the_system_or_the_test_override(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TEST_AVAILABLE_ENV, raising=False)
    assert available_memory() > 0
    monkeypatch.setenv(TEST_AVAILABLE_ENV, str(5 * MEMORY_MARGIN))
    # The override is the machine's memory besides this process's model workers (none here).
    assert 5 * MEMORY_MARGIN == available_memory()
    monkeypatch.setattr(memory, "_workers_resident", lambda: MEMORY_MARGIN)
    assert 4 * MEMORY_MARGIN == available_memory()
