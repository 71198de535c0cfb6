"""Catalog pins: written, applied while the catalog's source is the same, ignored otherwise."""

from __future__ import annotations

from pathlib import Path

import attrs

from actors.spec import ModelSpec
from supervisor.pins import apply_pins, pin_path, write_pin

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_pins(tmp_path: Path) -> None:
    catalog = ModelSpec(id="cat", name="Cat", source="hf.co/u/r:q8_0")
    pinned = attrs.evolve(catalog, source="hf.co/u/r:Q8_0", revision=COMMIT, file="m.Q8_0.gguf",
                          url=f"https://hub.example/u/r/resolve/{COMMIT}/m.Q8_0.gguf",
                          sha256="a" * 64, size=123)
    assert [catalog] == apply_pins(tmp_path, [catalog])  # nothing kept yet
    write_pin(tmp_path, pinned)
    [applied] = apply_pins(tmp_path, [catalog])
    assert (pinned.url, pinned.sha256, pinned.size, COMMIT, "m.Q8_0.gguf", "Q8_0") == (
        applied.url, applied.sha256, applied.size, applied.revision, applied.file,
        applied.quantization)
    # The catalog now names another file: the old pin does not apply.
    moved = attrs.evolve(catalog, source="hf.co/u/r:Q4_K_M")
    assert [moved] == apply_pins(tmp_path, [moved])
    # A model with a url is never touched; a damaged pin is ignored.
    plain = ModelSpec(id="cat", name="Cat", url="https://x.example/m.gguf")
    assert [plain] == apply_pins(tmp_path, [plain])
    pin_path(tmp_path, "cat").write_text("{not json")
    assert [catalog] == apply_pins(tmp_path, [catalog])
