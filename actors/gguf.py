"""GGUF header checks and metadata, before any runtime touches the file.

ctransformers crashes the whole process (SIGSEGV) on some damaged headers instead of raising,
so every file is read here first with the pure-Python `gguf` reader. This module is blocking:
callers run `inspect_gguf` in `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import attrs
import gguf

from actors.runtimes import runnable


class GGUFInvalid(Exception):
    """The file is not a GGUF model that modeld can load; the message says why and what to do."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


SUPPORTED_VERSIONS = (2, 3)
# No real model comes near these; a header claiming more is damaged.
MAX_TENSORS = 1_000_000
MAX_KVS = 1_000_000
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


class _CheckedReader(gguf.GGUFReader):
    """A GGUFReader that reports tensor data running past the end of the file as truncation.

    The stock reader fails there with a numpy reshape error that tells a person nothing.
    """

    def _build_tensors(self, start_offs: int, fields: list[gguf.ReaderField]) -> None:
        file_size = len(self.data)
        for field in fields:
            end = _tensor_end(start_offs, field)
            if end is not None and end > file_size:
                raise _Truncated(end, file_size)
        super()._build_tensors(start_offs, fields)


class _Truncated(Exception):
    def __init__(self, needed: int, actual: int) -> None:
        super().__init__(needed, actual)
        self.needed = needed
        self.actual = actual


def _tensor_end(start_offs: int, field: gguf.ReaderField) -> int | None:
    """Where one tensor's data ends, or None if its info is too odd to tell (the reader decides)."""
    try:
        dims = [int(d) for d in field.parts[3]]
        ggml_type = gguf.GGMLQuantizationType(int(field.parts[4][0]))
        offset = int(field.parts[5][0])
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    except (IndexError, ValueError, KeyError, TypeError):
        return None
    n_elements = 1
    for d in dims:
        n_elements *= d
    return start_offs + offset + n_elements * type_size // block_size


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
    magic = header[:4]
    if magic != b"GGUF":
        raise GGUFInvalid(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
            "modeld loads GGUF models only."
        )
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


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def _int_field(reader: gguf.GGUFReader, key: str) -> int | None:
    value = _field(reader, key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_field(reader: gguf.GGUFReader, key: str) -> str | None:
    value = _field(reader, key)
    return value if isinstance(value, str) else None


def _quantization(reader: gguf.GGUFReader) -> str | None:
    file_type = _int_field(reader, "general.file_type")
    if file_type is not None:
        try:
            name = gguf.LlamaFileType(file_type).name
        except ValueError:
            name = None
        if name is not None and name != "GUESSED":
            return str(name).removeprefix("MOSTLY_").removeprefix("ALL_")
    # No usable file_type: name the type holding most of the bytes.
    bytes_by_type: dict[str, int] = {}
    for tensor in reader.tensors:
        type_name = str(tensor.tensor_type.name)
        bytes_by_type[type_name] = bytes_by_type.get(type_name, 0) + int(tensor.n_bytes)
    if not bytes_by_type:
        return None
    return max(bytes_by_type, key=lambda k: bytes_by_type[k])


# GGUF value types with a fixed size (type id -> bytes); 8 is a string, 9 an array.
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def architecture_from_prefix(data: bytes) -> str | None:
    """`general.architecture` from the first bytes of a GGUF file (the upload's first MiB),
    or None when those bytes do not hold it (yet) or are not GGUF. Never raises."""
    if len(data) < _HEADER_SIZE or data[:4] != b"GGUF":
        return None
    _version, _tensors, kv_count = struct.unpack_from("<IQQ", data, 4)
    pos = _HEADER_SIZE

    def string_at(at: int) -> tuple[bytes, int]:
        (length,) = struct.unpack_from("<Q", data, at)
        end = at + 8 + length
        if end > len(data):
            raise IndexError
        return data[at + 8 : end], end

    try:
        for _ in range(min(kv_count, MAX_KVS)):
            key, pos = string_at(pos)
            (kind,) = struct.unpack_from("<I", data, pos)
            pos += 4
            if key == b"general.architecture":
                if kind != _STRING:
                    return None
                value, _ = string_at(pos)
                return value.decode("utf-8", errors="replace")
            if kind == _STRING:
                _, pos = string_at(pos)
            elif kind in _FIXED_SIZES:
                pos += _FIXED_SIZES[kind]
            elif kind == _ARRAY:
                item_kind, count = struct.unpack_from("<IQ", data, pos)
                pos += 12
                if item_kind in _FIXED_SIZES:
                    pos += _FIXED_SIZES[item_kind] * count
                elif item_kind == _STRING:
                    for _ in range(count):
                        _, pos = string_at(pos)
                else:
                    return None
            else:
                return None
            if pos > len(data):
                return None
    except (struct.error, IndexError):
        return None
    return None


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
        reader = _CheckedReader(path)
    except _Truncated as exc:
        raise GGUFInvalid(
            f"{path} is truncated: its tensors need {exc.needed} bytes but the file has only "
            f"{exc.actual}; the download is incomplete, download the model again."
        ) from None
    except Exception as exc:
        raise GGUFInvalid(
            f"{path} is damaged and cannot be read as GGUF ({type(exc).__name__}: {exc}); "
            "download the model again."
        ) from exc

    architecture = _str_field(reader, "general.architecture")
    if architecture is None:
        raise GGUFInvalid(
            f"{path} has no general.architecture entry, so the runtime cannot tell how to "
            "run it; use a GGUF file made by a current converter."
        )
    if not runnable(architecture):
        raise GGUFInvalid(unrunnable_message(architecture))

    vocab_size = _int_field(reader, f"{architecture}.vocab_size")
    if vocab_size is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab_size = len(tokens.data) if tokens is not None else None

    return GGUFInfo(
        architecture=architecture,
        context_length=_int_field(reader, f"{architecture}.context_length"),
        embedding_length=_int_field(reader, f"{architecture}.embedding_length"),
        block_count=_int_field(reader, f"{architecture}.block_count"),
        vocab_size=vocab_size,
        quantization=_quantization(reader),
        parameter_count=sum(int(t.n_elements) for t in reader.tensors),
        chat_template=_str_field(reader, "tokenizer.chat_template"),
        name=_str_field(reader, "general.name"),
        file_size=file_size,
    )
