"""What `modeld prune` counts as stray: files of models that are gone, old temp files and links;
never a known model's file, partial, sidecar or pin, nor a fresh temp file."""

from __future__ import annotations

import os
import time
from pathlib import Path

from supervisor.prune import TEMP_AGE_SECONDS, find_strays, remove_strays


def layout(root: Path) -> None:
    models, pins = root / "models", root / "pins"
    models.mkdir(parents=True)
    pins.mkdir()
    for name in ("kept.gguf", "kept.gguf.partial", "kept.gguf.partial.json", "kept.gguf.held",
                 "gone.gguf.partial", "gone.gguf.partial.json", "a.gguf.gguf",
                 ".kept.gguf.abcdefgh.import", ".old.gguf.abcdefgh.import", "notes.txt",
                 "kept-00002-of-00003.gguf", "kept-00001-of-00003.gguf.partial",
                 "gone-00001-of-00002.gguf"):
        (models / name).write_bytes(b"x" * 10)
    (pins / "kept.json").write_text("{}")
    (pins / "gone.json").write_text("{}")
    updates = root / "updates"  # a Hub update's new set, its partials and its journal
    updates.mkdir()
    for name in ("kept-00001-of-00002.gguf", "kept-00002-of-00002.gguf.partial", "kept.json",
                 "gone-00001-of-00002.gguf", "gone.json"):
        (updates / name).write_bytes(b"x" * 10)
    old = time.time() - TEMP_AGE_SECONDS - 5
    os.utime(models / ".old.gguf.abcdefgh.import", (old, old))
    (models / "link.gguf").symlink_to(root / "outside")
    (root / "outside").write_bytes(b"keep me")


def test_only_what_no_model_owns_is_stray(tmp_path: Path) -> None:
    layout(tmp_path)
    strays = find_strays(tmp_path, lambda: ["kept", "a.gguf"])
    names = {s.path.name: s for s in strays}
    assert {"gone.gguf.partial", "gone.gguf.partial.json", "gone.json",
            ".old.gguf.abcdefgh.import", "notes.txt", "link.gguf",
            "gone-00001-of-00002.gguf"} == set(names)
    assert {"updates/gone.json", "updates/gone-00001-of-00002.gguf"} <= {
        f"{s.path.parent.name}/{s.path.name}" for s in strays}
    assert "model 'gone' no longer exists" == names["gone.gguf.partial"].reason
    assert 10 == names["gone.gguf.partial"].bytes
    assert 0 == names["link.gguf"].bytes

    removed = remove_strays(strays)
    assert len(strays) == len(removed)
    left = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert [".kept.gguf.abcdefgh.import", "a.gguf.gguf", "kept-00001-of-00003.gguf.partial",
            "kept-00002-of-00003.gguf", "kept.gguf", "kept.gguf.held", "kept.gguf.partial",
            "kept.gguf.partial.json"] == left
    assert ["kept.json"] == [p.name for p in (tmp_path / "pins").iterdir()]
    assert ["kept-00001-of-00002.gguf", "kept-00002-of-00002.gguf.partial", "kept.json"] == sorted(
        p.name for p in (tmp_path / "updates").iterdir())
    assert b"keep me" == (tmp_path / "outside").read_bytes()  # the link, not its target
    assert [] == find_strays(tmp_path, lambda: ["kept", "a.gguf"])


def test_ids_are_read_after_the_listing(tmp_path: Path) -> None:
    """A model created while prune lists owns the files it made."""
    layout(tmp_path)
    created: list[str] = []

    def ids() -> list[str]:
        created.append("gone")  # created between the listing and this call
        return ["kept", "a.gguf", *created]

    strays = {s.path.name for s in find_strays(tmp_path, ids)}
    assert not strays & {"gone.gguf.partial", "gone.gguf.partial.json", "gone.json"}
