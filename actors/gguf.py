"""GGUF header checks and metadata, before any runtime touches the file.

ctransformers crashes the whole process (SIGSEGV) on some damaged headers instead of raising,
so every file is read here first (actors/gguf_header.py; the `gguf` package gives the tensor
type tables). This module is blocking:
callers run `inspect_gguf` in `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any

import attrs

from actors.gguf_header import (
    MAX_KVS,
    MAX_TENSORS,
    ArrayValue,
    HeaderError,
    HeaderLimit,
    TensorEntry,
    read_header,
)
from actors.memory import MemoryShape, shape_of
from actors.runtimes import runnable


class GGUFInvalid(Exception):
    """The file is not a GGUF model that modeld can load; the message says why and what to do."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


GGUF_MAGIC = b"GGUF"


class ArchitectureUnsupported(GGUFInvalid):
    """A well-formed file of an architecture that no runtime of modeld runs."""


SUPPORTED_VERSIONS = (2, 3)
_HEADER_SIZE = 24  # magic, version, tensor count, kv count
# Smallest possible encodings, used to bound the counts by the file size.
_MIN_KV_SIZE = 8 + 1 + 4 + 1  # key length, 1-byte key, type, 1-byte value
_MIN_TENSOR_INFO_SIZE = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one dim, type, offset


@attrs.frozen
class GGUFInfo:
    """What a GGUF file says about the model inside it."""

    architecture: str
    context_length: int | None
    embedding_length: int | None
    block_count: int | None
    vocab_size: int | None
    quantization: str | None
    parameter_count: int
    chat_template: str | None
    name: str | None
    file_size: int
    memory: MemoryShape  # what it will take in memory (actors/memory.py)


def check_magic(head: bytes, what: str) -> None:
    """Raise GGUFInvalid unless `head` (a file's first bytes, at least 4) starts as GGUF does:
    the cheap first check, also run on a download's first bytes."""
    magic = head[: len(GGUF_MAGIC)]
    if magic != GGUF_MAGIC:
        raise GGUFInvalid(
            f"{what} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
            "modeld loads GGUF models only."
        )


def _check_header(path: Path, file_size: int) -> None:
    if file_size == 0:
        raise GGUFInvalid(f"{path} is empty; download the model again.")
    if file_size < _HEADER_SIZE:
        raise GGUFInvalid(
            f"{path} is only {file_size} bytes, too short for a GGUF header; "
            "download the model again."
        )
    with path.open("rb") as f:
        header = f.read(_HEADER_SIZE)
    check_magic(header, str(path))
    version, tensor_count, kv_count = struct.unpack("<IQQ", header[4:])
    if version not in SUPPORTED_VERSIONS:
        raise GGUFInvalid(
            f"{path} is GGUF version {version}; only versions 2 and 3 are supported. "
            "Use a GGUF v2 or v3 build of the model."
        )
    if tensor_count == 0 or tensor_count > min(MAX_TENSORS, file_size // _MIN_TENSOR_INFO_SIZE):
        raise GGUFInvalid(
            f"{path} claims {tensor_count} tensors, impossible for a {file_size}-byte file; "
            "the header is damaged, download the model again."
        )
    if kv_count > min(MAX_KVS, file_size // _MIN_KV_SIZE):
        raise GGUFInvalid(
            f"{path} claims {kv_count} metadata entries, impossible for a {file_size}-byte "
            "file; the header is damaged, download the model again."
        )


def _int_field(fields: dict[str, Any], key: str) -> int | None:
    value = fields.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_field(fields: dict[str, Any], key: str) -> str | None:
    value = fields.get(key)
    return value if isinstance(value, str) else None


def _tensor_bytes(tensor: TensorEntry) -> int:
    """The bytes of one tensor's data. Raises HeaderError for an unknown tensor type."""
    import gguf  # (with numpy: 0.25 s) only once a file is inspected, not at every start

    try:
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor.ggml_type)]
    except (ValueError, KeyError):
        raise HeaderError(f"tensor {tensor.name!r} has unknown type {tensor.ggml_type}") from None
    return tensor.n_elements * type_size // block_size


def _quantization(fields: dict[str, Any], tensors: list[TensorEntry]) -> str | None:
    import gguf

    file_type = _int_field(fields, "general.file_type")
    if file_type is not None:
        try:
            name = gguf.LlamaFileType(file_type).name
        except ValueError:
            name = None
        if name is not None and name != "GUESSED":
            return str(name).removeprefix("MOSTLY_").removeprefix("ALL_")
    # No usable file_type: name the type holding most of the bytes.
    bytes_by_type: dict[str, int] = {}
    for tensor in tensors:
        type_name = gguf.GGMLQuantizationType(tensor.ggml_type).name
        bytes_by_type[type_name] = bytes_by_type.get(type_name, 0) + _tensor_bytes(tensor)
    if not bytes_by_type:
        return None
    return max(bytes_by_type, key=lambda k: bytes_by_type[k])


def architecture_from_prefix(data: bytes) -> str | None:
    """`general.architecture` from the first bytes of a GGUF file (the upload's first MiB),
    or None when those bytes do not hold it (yet) or are not GGUF. Never raises."""
    try:
        header = read_header(data, stop_at="general.architecture")
    except (HeaderError, struct.error):
        return None
    return _str_field(header.fields, "general.architecture")


def unrunnable_message(architecture: str) -> str:
    return (
        f"the file is a {architecture!r} model, an architecture that neither llama.cpp nor "
        "ctransformers runs; choose a GGUF build of a model llama.cpp supports"
    )


def inspect_gguf(path: Path) -> GGUFInfo:
    """Check that path is a GGUF model a runtime of modeld can load, and return its metadata.

    Blocking (reads the header and the tensor table). Raises GGUFInvalid with a sentence a
    person can act on when the file is damaged, truncated, not GGUF, or of an unsupported
    architecture; OSError when the file cannot be opened at all.
    """
    file_size = os.stat(path).st_size
    _check_header(path, file_size)
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                header = read_header(view)
            finally:
                view.release()
        ends = [header.data_offset + t.offset + _tensor_bytes(t) for t in header.tensors]
    except HeaderLimit as exc:
        raise GGUFInvalid(
            f"{path} is refused: {exc}; no real model comes near that, so the file is "
            "damaged or hostile"
        ) from None
    except (HeaderError, struct.error) as exc:
        raise GGUFInvalid(
            f"{path} is damaged and cannot be read as GGUF ({exc}); download the model again."
        ) from None
    needed = max(ends, default=header.data_offset)
    if needed > file_size:
        raise GGUFInvalid(
            f"{path} is truncated: its tensors need {needed} bytes but the file has only "
            f"{file_size}; the download is incomplete, download the model again."
        )
    fields = header.fields

    architecture = _str_field(fields, "general.architecture")
    if architecture is None:
        raise GGUFInvalid(
            f"{path} has no general.architecture entry, so the runtime cannot tell how to "
            "run it; use a GGUF file made by a current converter."
        )
    if not runnable(architecture):
        raise ArchitectureUnsupported(unrunnable_message(architecture))

    vocab_size = _int_field(fields, f"{architecture}.vocab_size")
    if vocab_size is None:
        tokens = fields.get("tokenizer.ggml.tokens")
        vocab_size = tokens.count if isinstance(tokens, ArrayValue) else None

    return GGUFInfo(
        architecture=architecture,
        context_length=_int_field(fields, f"{architecture}.context_length"),
        embedding_length=_int_field(fields, f"{architecture}.embedding_length"),
        block_count=_int_field(fields, f"{architecture}.block_count"),
        vocab_size=vocab_size,
        quantization=_quantization(fields, header.tensors),
        parameter_count=sum(t.n_elements for t in header.tensors),
        chat_template=_str_field(fields, "tokenizer.chat_template"),
        name=_str_field(fields, "general.name"),
        file_size=file_size,
        memory=shape_of(
            tensor_bytes=sum(_tensor_bytes(t) for t in header.tensors),
            layers=_int_field(fields, f"{architecture}.block_count"),
            embedding=_int_field(fields, f"{architecture}.embedding_length"),
            heads=_int_field(fields, f"{architecture}.attention.head_count"),
            heads_kv=_int_field(fields, f"{architecture}.attention.head_count_kv"),
            key_length=_int_field(fields, f"{architecture}.attention.key_length"),
            value_length=_int_field(fields, f"{architecture}.attention.value_length"),
            vocab=vocab_size,
        ),
    )
