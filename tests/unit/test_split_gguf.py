"""tests/gguf_factory.split_gguf makes llama.cpp's split format: real llama.cpp loads the set
from its first part (finding the others next to it by name), and refuses it with a part
missing."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

from actors.backends.llamacpp import LlamaCppBackend
from tests.gguf_factory import split_gguf, write_tiny_llama


def test_split_parts_load_in_llama_cpp(tmp_path: Path) -> None:
    parts = split_gguf(write_tiny_llama(tmp_path / "whole.gguf", seed=5), 3)
    paths = [tmp_path / f"m-{k:05d}-of-00003.gguf" for k in (1, 2, 3)]
    for path, data in zip(paths, parts, strict=True):
        path.write_bytes(data)
    counts = []
    for k, path in enumerate(paths):
        fields = GGUFReader(path).fields
        assert (k, 3) == (fields["split.no"].contents(), fields["split.count"].contents())
        counts.append(len(GGUFReader(path).tensors))
    assert sum(counts) == len(GGUFReader(tmp_path / "whole.gguf").tensors)
    backend = LlamaCppBackend(paths[0], context_length=64, threads=1, parallel=1)
    assert backend.context_length >= 64
    paths[2].unlink()
    with pytest.raises(Exception):  # noqa: B017 - the runtime's own error type
        LlamaCppBackend(paths[0], context_length=64, threads=1, parallel=1)
