"""Fixtures shared by the actor tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gguf_factory import write_tiny_llama


@pytest.fixture
def gguf(tmp_path: Path) -> bytes:
    """The bytes of a tiny, valid llama GGUF."""
    return write_tiny_llama(tmp_path / "source.gguf", seed=1).read_bytes()
