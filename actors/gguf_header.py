"""A fast reader of a GGUF file's header: metadata and tensor table, never the tensor data.

The `gguf` package's reader builds a numpy view per array element: on a current model's
vocabulary (Gemma 3: 262,144 tokens) that takes 30 s or more. This reader walks the same bytes
with `struct`, keeps scalars and strings, and keeps only the length of arrays. Blocking; it
raises HeaderError on bytes that are not a well-formed header (or end before it does), and
HeaderLimit on a header beyond the caps below.

The header is untrusted input (an upload, a download, a file planted in the storage dir), so
the reader has hard caps: it never looks past MAX_HEADER bytes, and the counts it loops over
are checked before the loop. Memory then stays below about MAX_HEADER and the worst case costs
well under a second of CPU (MAX_STRINGS empty strings skipped), whatever the file claims.
Real files stay far below every cap: the largest vocabularies hold about 260k tokens (plus as
many merges), chat templates a few KB, whole headers 10-20 MB.
"""

from __future__ import annotations

import struct
from typing import Any

import attrs

_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
MAX_DIMS = 8
MAX_HEADER = 64 * 1024 * 1024  # metadata and tensor table together
MAX_STRING = 1024 * 1024  # one key or string value
MAX_ARRAY = 1 << 20  # elements of one array
MAX_STRINGS = 1 << 21  # elements of all string arrays together
MAX_KVS = 1 << 16
MAX_TENSORS = 1 << 17


class HeaderError(Exception):
    """The bytes are not a well-formed GGUF header; the message says where it broke."""


class HeaderLimit(HeaderError):
    """The header is beyond one of the reader's caps; the message names the cap."""


@attrs.frozen
class ArrayValue:
    """An array's element type and length (its elements are not read)."""

    item_type: int
    count: int


@attrs.frozen
class TensorEntry:
    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


@attrs.frozen
class Header:
    version: int
    fields: dict[str, Any]
    tensors: list[TensorEntry]
    data_offset: int  # where tensor data starts (aligned)


class _Cursor:
    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data
        self.pos = 0
        self.end = min(len(data), MAX_HEADER)
        self.strings = 0  # elements of string arrays so far

    def past_end(self, what: str, at: int) -> HeaderError:
        if self.end < len(self.data):
            return HeaderLimit(f"the header is larger than {MAX_HEADER} bytes")
        return HeaderError(f"{what} at byte {at} runs past the header")

    def unpack(self, fmt: str, size: int) -> Any:
        if self.pos + size > self.end:
            if self.end < len(self.data):
                raise self.past_end("a value", self.pos)
            raise HeaderError(f"the header ends early (at byte {self.pos})")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def count(self, what: str, limit: int) -> int:
        value: int = self.unpack("<Q", 8)
        if value > limit:
            raise HeaderLimit(f"{what} at byte {self.pos - 8} claims {value} entries, "
                              f"more than the {limit} modeld reads")
        return value

    def string(self) -> str:
        length = self.unpack("<Q", 8)
        if length > MAX_STRING:
            raise HeaderLimit(f"a string at byte {self.pos - 8} is {length} bytes long, "
                              f"more than the {MAX_STRING} modeld reads")
        if self.pos + length > self.end:
            raise self.past_end("a string", self.pos)
        raw = bytes(self.data[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        self.strings += count
        if self.strings > MAX_STRINGS:
            raise HeaderLimit(f"the header's string arrays hold more than {MAX_STRINGS} "
                              "strings in all")
        # One tight loop: a vocabulary holds a few hundred thousand strings. Each length is
        # at most the rest of the (capped) header, so `pos` stays small.
        data, pos, end = self.data, self.pos, self.end
        unpack = _U64.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise self.past_end("a string array", self.pos)
            pos += 8 + unpack(data, pos)[0]
        if pos > end:
            raise self.past_end("a string array", self.pos)
        self.pos = pos

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            fmt, size = _SCALARS[kind]
            return self.unpack(fmt, size)
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_type = self.unpack("<I", 4)
            count = self.count("an array", MAX_ARRAY)
            if item_type in _SCALARS:
                size = _SCALARS[item_type][1] * count
                if self.pos + size > self.end:
                    raise self.past_end("an array", self.pos)
                self.pos += size
            elif item_type == _STRING:
                self.skip_strings(count)
            else:
                raise HeaderError(f"an array of unknown type {item_type} at byte {self.pos}")
            return ArrayValue(item_type, count)
        raise HeaderError(f"unknown metadata value type {kind} at byte {self.pos}")


def read_header(data: bytes | memoryview, *, stop_at: str | None = None) -> Header:
    """Parse the header in data (the file's bytes, or a memoryview of its mmap).

    With stop_at, parsing stops once that key is read (the tensor table is then empty).
    Raises HeaderError (HeaderLimit when the header is beyond a cap).
    """
    cursor = _Cursor(data)
    if bytes(data[:4]) != b"GGUF":
        raise HeaderError("no GGUF magic")
    cursor.pos = 4
    version = cursor.unpack("<I", 4)
    tensor_count = cursor.count("the tensor table", MAX_TENSORS)
    kv_count = cursor.count("the metadata", MAX_KVS)
    fields: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string()
        kind = cursor.unpack("<I", 4)
        fields[key] = cursor.value(kind)
        if key == stop_at:
            return Header(version, fields, [], 0)
    tensors = []
    for _ in range(tensor_count):
        name = cursor.string()
        n_dims = cursor.unpack("<I", 4)
        if not 1 <= n_dims <= MAX_DIMS:
            raise HeaderError(f"tensor {name!r} claims {n_dims} dimensions")
        dims = tuple(cursor.unpack("<Q", 8) for _ in range(n_dims))
        ggml_type = cursor.unpack("<I", 4)
        offset = cursor.unpack("<Q", 8)
        tensors.append(TensorEntry(name, dims, ggml_type, offset))
    alignment = fields.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
        raise HeaderError(f"general.alignment is {alignment!r}")
    data_offset = -(-cursor.pos // alignment) * alignment
    return Header(version, fields, tensors, data_offset)
