"""Split GGUF models (llama.cpp's `name-00001-of-00003.gguf`): where the parts live, when the set
counts as published, and the order they are downloaded and published in.

The parts of model `x` are `models/x-0000k-of-0000n.gguf` (model ids never end like that:
actors/spec.py), the names llama.cpp expects: it loads the set from the first part and finds
the others next to it. Each part is downloaded by the one download path (actors/download),
verified against its own sha256 and published under its final name by it; the first part is
downloaded (so published) last. The set counts as published only when every part is there,
so a crash at any point leaves nothing that looks published; a part found at its final name
while the set is not complete is used only when its sha256 still matches (it may be left from
another version of the model). Everything here is blocking unless said otherwise.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import attrs
import httpx
import trio

from actors.download import DownloadRequest, ProgressSink
from actors.download.origin import same_origin
from actors.messages import FileFacts
from actors.partial import partial_bytes
from actors.spec import ModelSpec, SplitPart
from actors.store import OWNED_SUFFIXES, Store


def part_path(base: Path, number: int, count: int) -> Path:
    """Part `number` (1-based) of `count`, for a model whose single file would be `base`."""
    return base.with_name(f"{base.name.removesuffix('.gguf')}-{number:05d}-of-{count:05d}.gguf")


def part_paths(store: Store, spec: ModelSpec, base: Path | None = None) -> list[Path]:
    """The final paths of a split model's parts, in order (empty for one file); beside `base`
    instead of the model's file (a Hub update's, in `updates/`) when given."""
    base = store.model_path(spec.id) if base is None else base
    return [part_path(base, k, len(spec.parts)) for k in range(1, len(spec.parts) + 1)]


def model_file(store: Store, spec: ModelSpec) -> Path:
    """The file a runtime loads: the model's file, or a split model's first part."""
    paths = part_paths(store, spec)
    return paths[0] if paths else store.model_path(spec.id)


def whole_set(facts: FileFacts | None, spec: ModelSpec) -> FileFacts | None:
    """The facts of a split model's first part made the set's: its size the set's, and the
    other parts' bytes counted as tensors (they hold little else) for the memory estimate."""
    if facts is None or not spec.parts:
        return facts
    rest = sum(p.size for p in spec.parts[1:])
    memory = None if facts.memory is None else attrs.evolve(
        facts.memory, tensor_bytes=facts.memory.tensor_bytes + rest)
    return attrs.evolve(facts, size=sum(p.size for p in spec.parts), memory=memory)


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def published(store: Store, spec: ModelSpec) -> bool:
    """The model's file is there: for a split model, every part (regular files, never links)."""
    if not spec.parts:
        return store.has_model_file(spec.id)
    return all(_is_regular(p) for p in part_paths(store, spec))


def done_bytes(store: Store, spec: ModelSpec) -> int:
    """Bytes of the model downloaded so far: its partial, or for a split model the parts at
    their final names and the partials of the others."""
    if not spec.parts:
        return partial_bytes(store.model_path(spec.id))
    done = 0
    for path, part in zip(part_paths(store, spec), spec.parts, strict=True):
        done += part.size if _is_regular(path) else partial_bytes(path)
    return done


def delete_files(store: Store, spec: ModelSpec) -> None:
    """Remove the model's files: the first part goes first, so that a crash midway never
    leaves a set that looks whole; then the other parts, each with its partial and sidecar."""
    for path in part_paths(store, spec):
        for suffix in OWNED_SUFFIXES:
            path.with_name(path.name + suffix).unlink(missing_ok=True)
    store.delete_model_files(spec.id)


def download_order(store: Store, spec: ModelSpec,
                   base: Path | None = None) -> list[tuple[Path, SplitPart, int]]:
    """Each part's path (beside `base`: see part_paths), the part, and the bytes of the set
    counted before it: parts 2..n in order, then the first, which is published last."""
    items = list(zip(part_paths(store, spec, base), spec.parts, strict=True))
    ordered = items[1:] + items[:1]
    out, before = [], 0
    for path, part in ordered:
        out.append((path, part, before))
        before += part.size
    return out


def still_valid(path: Path, part: SplitPart) -> bool:
    """Whether a part at its final name has the part's size and sha256 (it is then kept; else
    `drop` it and download it again). Reads only: it may run in a thread a cancel abandons."""
    if not _is_regular(path) or path.stat().st_size != part.size:
        return False
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest() == part.sha256


def drop(path: Path) -> None:
    """Remove a part that is not the part's (so it cannot count as published)."""
    path.unlink(missing_ok=True)


class SetProgress:
    """A ProgressSink for one part that reports to the model's sink over the whole set: the
    bytes of the parts before it added, the set's total as the total."""

    def __init__(self, sink: ProgressSink, before: int, total: int) -> None:
        self._sink = sink
        self._before = before
        self._total = total

    def update(self, done: int, total: int | None, *, connections: int | None = None) -> None:
        self._sink.update(self._before + done, self._total, connections=connections)

    def reset(self, reason: str) -> None:
        self._sink.reset(reason)

    def retrying(self, attempt: int, delay: float, reason: str) -> None:
        self._sink.retrying(attempt, delay, reason)


def part_requests(store: Store, spec: ModelSpec, template: DownloadRequest,
                  base: Path | None = None) -> Iterator[tuple[DownloadRequest, SplitPart, int]]:
    """The download request of each part in download order (beside `base`: see part_paths),
    made from the model's `template` (its settings and headers; the first part alone runs
    the template's `verify`: the others hold only tensors and the `split.*` keys)."""
    order = download_order(store, spec, base)
    first = order[-1][0]
    for path, part, before in order:
        # The template's own headers (a Hub token) only for parts at its origin.
        headers = template.headers if same_origin(httpx.URL(part.url),
                                                  httpx.URL(template.url)) else ()
        yield (attrs.evolve(
            template, url=part.url, dest=path, sha256=part.sha256, size=part.size,
            verify=template.verify if path == first else None, headers=headers,
        ), part, before)


async def fetch_parts(store: Store, spec: ModelSpec, template: DownloadRequest,
                      sink: ProgressSink,
                      fetch: Callable[[DownloadRequest, ProgressSink], Awaitable[None]],
                      base: Path | None = None) -> None:
    """Download a split model's parts one after the other (beside `base`: see part_paths) with
    `fetch`, one progress over the whole set on `sink`; a part already verified at its final
    name is kept."""
    total = sum(p.size for p in spec.parts)
    for request, part, before in part_requests(store, spec, template, base):
        if await trio.to_thread.run_sync(still_valid, request.dest, part,
                                         abandon_on_cancel=True):
            continue
        await trio.to_thread.run_sync(drop, request.dest)
        await fetch(request, SetProgress(sink, before, total))
