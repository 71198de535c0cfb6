"""What a model actor learns from a model file's header, and whether the model can fit in
memory, before a worker process is started for it."""

from __future__ import annotations

import psutil

from actors import messages as m
from actors.errors import InsufficientMemory
from actors.gguf import GGUFInfo
from actors.spec import ModelSpec

MEMORY_MARGIN = 256 * 1024 * 1024


def facts_from(info: GGUFInfo) -> m.FileFacts:
    return m.FileFacts(
        size=info.file_size,
        context_length=info.context_length,
        quantization=info.quantization,
        parameter_count=info.parameter_count,
        architecture=info.architecture,
        chat_template=info.chat_template,
    )


def check_memory(spec: ModelSpec, file_size: int) -> None:
    """Refuse a model that cannot fit: its catalog `ram`, else its file size (the worker reads
    the weights into memory), plus a margin, against what is available now. Raises
    InsufficientMemory."""
    need = spec.ram or file_size
    available = psutil.virtual_memory().available
    if need + MEMORY_MARGIN > available:
        raise InsufficientMemory(
            f"loading needs about {need / 1e9:.1f} GB ({need} bytes) but only "
            f"{available / 1e9:.1f} GB are available; unload other models or free memory",
        )
