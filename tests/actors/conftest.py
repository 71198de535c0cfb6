"""Fixtures shared by the actor tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from tests.gguf_factory import write_tiny_llama

T = TypeVar("T")


@pytest.fixture
def gguf(tmp_path: Path) -> bytes:
    """The bytes of a tiny, valid llama GGUF."""
    return write_tiny_llama(tmp_path / "source.gguf", seed=1).read_bytes()


@pytest.fixture
def inline_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """trio.to_thread.run_sync runs its function inline, after a checkpoint: an actor's
    blocking store work then keeps step with the autojump clock."""
    async def run_sync(fn: Callable[..., T], *args: Any, **_kwargs: Any) -> T:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
