"""Where a catalog model's Hub source was pinned: `<storage>/pins/<id>.json`.

A custom model's pin is in its record; a catalog model has no record (its spec is the config),
so the commit, file, url, sha256 and size its source resolved to at its first download are kept
here, and applied at start-up while the catalog's source stays the same. Blocking: call in a
thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import structlog

from actors.safe_files import read_own, write_atomic
from actors.spec import SHA256_PATTERN, ModelSpec, is_valid_id
from supervisor.hub_refs import BadReference, parse_reference, quant_tag

log = structlog.get_logger("modeld.pins")

PINNED = ("source", "revision", "file", "url", "sha256", "size")


def pin_path(root: Path, model_id: str) -> Path:
    if not is_valid_id(model_id):
        raise ValueError(f"invalid model id {model_id!r}")
    return root / "pins" / f"{model_id}.json"


def write_pin(root: Path, spec: ModelSpec) -> None:
    path = pin_path(root, spec.id)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    data: dict[str, object] = {name: getattr(spec, name) for name in PINNED}
    data["parts"] = [attrs.asdict(part) for part in spec.parts]  # a split set's
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True).encode())


def canonical_source(source: str) -> str | None:
    """`source` in its canonical form (hf.co/..., quantization upper-case), or None."""
    try:
        return parse_reference(source).canonical()
    except BadReference:
        return None


def apply_pins(root: Path, specs: list[ModelSpec]) -> list[ModelSpec]:
    """`specs` with the pins kept for them; a pin of another source than the catalog's now is
    left out (the catalog changed: the next download resolves the new one)."""
    out = []
    for spec in specs:
        if spec.source is not None and spec.url is None:
            spec = _pinned(root, spec)
        out.append(spec)
    return out


def _pinned(root: Path, spec: ModelSpec) -> ModelSpec:
    path = pin_path(root, spec.id)
    try:
        data = json.loads(read_own(path))  # never through a link or a FIFO
    except FileNotFoundError:
        return spec
    except (OSError, ValueError) as exc:
        log.error("pin_unreadable", model=spec.id, path=str(path), reason=str(exc))
        return spec
    if not isinstance(data, dict) or data.get("source") != canonical_source(spec.source or ""):
        return spec
    if not (isinstance(data.get("url"), str) and isinstance(data.get("size"), int)
            and isinstance(data.get("sha256"), str) and SHA256_PATTERN.fullmatch(data["sha256"])
            and isinstance(data.get("revision"), str) and isinstance(data.get("file"), str)):
        log.error("pin_unreadable", model=spec.id, path=str(path), reason="fields missing")
        return spec
    try:
        return attrs.evolve(spec, quantization=spec.quantization or quant_tag(data["file"]),
                            parts=data.get("parts", []), **{name: data[name] for name in PINNED})
    except TypeError as exc:
        log.error("pin_unreadable", model=spec.id, path=str(path), reason=str(exc))
        return spec
