"""What Store.open does with what a crash left (issue 18, item 10): temps are removed, and a
model made only to take an upload whose first upload was cut goes with its temp, as a refused
import leaves no record. A real Store in tmp_path; the crash is its leftovers."""

from __future__ import annotations

from pathlib import Path

from actors.spec import ModelSpec
from actors.store import Store


def test_a_crash_cut_first_upload_leaves_no_empty_model(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "storage")
    specs = {
        "cut": ModelSpec(id="cut", name="cut", custom=True),
        "with-url": ModelSpec(id="with-url", name="u", url="https://x.test/m.gguf", custom=True),
        "with-file": ModelSpec(id="with-file", name="f", custom=True),
        "waiting": ModelSpec(id="waiting", name="w", custom=True),  # made, never uploaded to
    }
    for spec in specs.values():
        store.write_record(spec)
    store.model_path("with-file").write_bytes(b"GGUF")
    for model_id in ("cut", "with-url", "with-file"):
        store.import_temp(model_id).write_bytes(b"GGUF half")  # a crash mid-upload
    Store.open(store.root)
    assert ["waiting", "with-file", "with-url"] == [s.id for s in store.load_records()]
    assert ["with-file.gguf"] == [p.name for p in store.model_path("x").parent.iterdir()]
