"""What a model actor learns from a model file's header, and whether the model can fit in
memory, before a worker process is started for it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import attrs
import structlog

from actors import messages as m
from actors.errors import InvalidInput
from actors.gguf import GGUFInfo, GGUFInvalid
from actors.memory import estimate_memory
from actors.runtimes import CTRANSFORMERS, RuntimeRefused, choose_runtime
from actors.spec import ModelSpec

log = structlog.get_logger("modeld.actor")



class RememberedInspect:
    """`inspect` that remembers its last answer for the file it read: the same file (device,
    inode, size, modification time) is not parsed again. A published file is never written
    in place (a new one is renamed over it), so the check of a download or import before
    publishing also serves the first load, and a load after an unload parses nothing; a
    vocabulary of 262k tokens takes 0.15 s to parse, on the path of every load."""

    def __init__(self, inspect: Callable[[Path], GGUFInfo]) -> None:
        self._inspect = inspect
        self._last: tuple[tuple[int, int, int, int], GGUFInfo] | None = None

    def __call__(self, path: Path) -> GGUFInfo:
        st = os.stat(path)
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        last = self._last
        if last is not None and last[0] == identity:
            return last[1]
        info = self._inspect(path)
        self._last = (identity, info)
        return info


def facts_from(info: GGUFInfo) -> m.FileFacts:
    return m.FileFacts(
        size=info.file_size,
        context_length=info.context_length,
        quantization=info.quantization,
        parameter_count=info.parameter_count,
        architecture=info.architecture,
        chat_template=info.chat_template,
        memory=info.memory,
    )


def read_facts(inspect: Callable[[Path], GGUFInfo], path: Path,
               model_id: str) -> m.FileFacts | None:
    """The facts of a published file (blocking); a bad file is logged here and refused at
    load, and then only its size is known."""
    try:
        return facts_from(inspect(path))
    except (GGUFInvalid, OSError) as exc:
        log.warning("model_file_invalid", model=model_id, reason=str(exc))
    try:
        return m.FileFacts(size=os.path.getsize(path))
    except OSError:
        return None


MAX_DEFAULT_CONTEXT = 4096  # tokens, when neither the model's record nor its file says less


def runtime_spec(spec: ModelSpec, info: GGUFInfo, default_runtime: str,
                 default_parallel: int) -> ModelSpec:
    """The spec a worker is started with: its runtime chosen from the file's architecture
    (InvalidInput when none runs it), a context length and the parallel slots set."""
    try:
        runtime = choose_runtime(spec.runtime or default_runtime, info.architecture,
                                 split=bool(spec.parts))
    except RuntimeRefused as exc:
        raise InvalidInput(str(exc), code="runtime_unsupported") from None
    return attrs.evolve(spec, runtime=runtime,
                        context_length=planned_context(spec, info.context_length),
                        parallel=planned_parallel(spec, runtime, default_parallel))


def planned_context(spec: ModelSpec, file_context: int | None) -> int:
    """The context a worker is started with: the model's own setting, else the file's, at
    most MAX_DEFAULT_CONTEXT."""
    return spec.context_length or min(file_context or MAX_DEFAULT_CONTEXT, MAX_DEFAULT_CONTEXT)


def planned_parallel(spec: ModelSpec, runtime: str, default_parallel: int) -> int:
    return 1 if runtime == CTRANSFORMERS else spec.parallel or default_parallel


def memory_need(spec: ModelSpec, facts: m.FileFacts | None, runtime: str | None,
                default_parallel: int) -> int | None:
    """Bytes `spec` will take loaded with `runtime` (actors/memory.py); None when the file's
    header is not known."""
    if facts is None or facts.memory is None or runtime is None:
        return None
    return estimate_memory(facts.memory, runtime, planned_context(spec, facts.context_length),
                           planned_parallel(spec, runtime, default_parallel)).total
