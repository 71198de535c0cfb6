"""`modeld import` reads a file to hash it (to find it already imported) only when a downloaded
model could be it: one with its size, or of an unknown size."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from supervisor.cli_import import model_with_file


class Models:
    def __init__(self, models: list[dict[str, Any]]) -> None:
        self._models = models

    def models(self) -> list[dict[str, Any]]:
        return self._models


def model(model_id: str, data: bytes | None, size: int | None) -> dict[str, Any]:
    return {"id": model_id, "downloaded": data is not None,
            "sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
            "bytes": {"value": size}}


def test_hashed_only_when_a_model_could_be_the_file(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(100))
    same = path.read_bytes()
    hashed: list[str] = []
    digest = hashlib.file_digest

    def counted(f: Any, name: str) -> Any:
        hashed.append(name)
        return digest(f, name)

    monkeypatch.setattr(hashlib, "file_digest", counted)
    others = [model("other", b"x" * 7, 7), model("absent", None, None)]
    assert model_with_file(Models(others), path) is None  # type: ignore[arg-type]
    assert [] == hashed
    found = model_with_file(Models([*others, model("it", same, len(same))]),  # type: ignore[arg-type]
                             path)
    assert found is not None and "it" == found["id"]
    assert ["sha256"] == hashed
    unknown = model_with_file(Models([model("unsized", same, None)]), path)  # type: ignore[arg-type]
    assert unknown is not None and "unsized" == unknown["id"]
