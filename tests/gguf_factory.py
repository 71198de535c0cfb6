"""Tiny random-weight llama GGUF files for tests, written with the standard library only.

The layout follows the recipe that ctransformers 0.2.27 is known to load: GGUF v3, little-endian,
alignment 32, f32 tensors, a 260-token byte-fallback vocabulary, two layers of width 64.
"""

from __future__ import annotations

import math
import random
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Literal

GGUF_MAGIC = b"GGUF"
ALIGNMENT = 32

# GGUF metadata value types.
_UINT32 = 4
_INT32 = 5
_FLOAT32 = 6
_STRING = 8
_ARRAY = 9
# GGML tensor type.
_GGML_F32 = 0

N_EMBD = 64
N_HEAD = 4
N_LAYER = 2
N_FF = 128
VOCAB = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁"]
TOKEN_TYPES = [2, 3, 3, *([6] * 256), 1]

# Each float pool holds this many floats; big tensors reuse rotated slices of it so that a
# 100 MB file costs one pool's worth of random numbers.
_POOL_FLOATS = 1 << 16


def _str(s: str) -> bytes:
    data = s.encode()
    return struct.pack("<Q", len(data)) + data


def _kv_u32(key: str, value: int) -> bytes:
    return _str(key) + struct.pack("<II", _UINT32, value)


def _kv_f32(key: str, value: float) -> bytes:
    return _str(key) + struct.pack("<If", _FLOAT32, value)


def _kv_str(key: str, value: str) -> bytes:
    return _str(key) + struct.pack("<I", _STRING) + _str(value)


def _kv_str_array(key: str, values: list[str]) -> bytes:
    head = _str(key) + struct.pack("<IIQ", _ARRAY, _STRING, len(values))
    return head + b"".join(_str(v) for v in values)


def _kv_f32_array(key: str, values: list[float]) -> bytes:
    head = _str(key) + struct.pack("<IIQ", _ARRAY, _FLOAT32, len(values))
    return head + struct.pack(f"<{len(values)}f", *values)


def _kv_i32_array(key: str, values: list[int]) -> bytes:
    head = _str(key) + struct.pack("<IIQ", _ARRAY, _INT32, len(values))
    return head + struct.pack(f"<{len(values)}i", *values)


def _tensor_shapes(n_ff: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("token_embd.weight", (N_EMBD, len(VOCAB))),
        ("output_norm.weight", (N_EMBD,)),
        ("output.weight", (N_EMBD, len(VOCAB))),
    ]
    for i in range(N_LAYER):
        shapes += [
            (f"blk.{i}.attn_norm.weight", (N_EMBD,)),
            (f"blk.{i}.attn_q.weight", (N_EMBD, N_EMBD)),
            (f"blk.{i}.attn_k.weight", (N_EMBD, N_EMBD)),
            (f"blk.{i}.attn_v.weight", (N_EMBD, N_EMBD)),
            (f"blk.{i}.attn_output.weight", (N_EMBD, N_EMBD)),
            (f"blk.{i}.ffn_norm.weight", (N_EMBD,)),
            (f"blk.{i}.ffn_gate.weight", (N_EMBD, n_ff)),
            (f"blk.{i}.ffn_down.weight", (n_ff, N_EMBD)),
            (f"blk.{i}.ffn_up.weight", (N_EMBD, n_ff)),
        ]
    return shapes


def _pool(rng: random.Random, sigma: float) -> bytes:
    return struct.pack(f"<{_POOL_FLOATS}f", *(rng.gauss(0.0, sigma) for _ in range(_POOL_FLOATS)))


def _chunks(rng: random.Random, pool: bytes, n_bytes: int) -> Iterator[bytes]:
    """Yield n_bytes of float data as rotations of pool (rotations keep 4-byte boundaries)."""
    while n_bytes > 0:
        shift = 4 * rng.randrange(_POOL_FLOATS)
        block = pool[shift:] + pool[:shift]
        yield block[:n_bytes]
        n_bytes -= len(block)


def _pad(f: BinaryIO) -> None:
    pos = f.tell()
    f.write(b"\0" * (-pos % ALIGNMENT))


def write_tiny_llama(
    path: Path,
    *,
    seed: int = 0,
    context_length: int = 128,
    chat_template: str | None = None,
    extra_bytes: int = 0,
    architecture: str | None = "llama",
    empty_strings: int = 0,
) -> Path:
    """Write a random-weight llama GGUF (about 470 KB) to path and return path.

    extra_bytes > 0 widens the feed-forward layers so the file grows by at least that many bytes;
    every extra byte is a real weight that a loader must read (unused tensors would be refused by
    the llama loader, which checks the tensor count). architecture=None leaves out
    general.architecture; another name relabels the model (and its keys) as that architecture.
    empty_strings > 0 adds a metadata array of that many empty strings (a hostile header: 8
    bytes a string).
    """
    rng = random.Random(seed)
    per_ff_unit = 3 * N_LAYER * N_EMBD * 4  # bytes added per unit of feed_forward_length
    n_ff = N_FF
    if extra_bytes > 0:
        n_ff += math.ceil(extra_bytes / per_ff_unit / 32) * 32

    arch = architecture or "llama"
    kvs = [
        *([_kv_str("general.architecture", architecture)] if architecture is not None else []),
        _kv_str("general.name", "tiny-llama"),
        _kv_u32("general.alignment", ALIGNMENT),
        _kv_u32("general.file_type", 0),  # ALL_F32
        _kv_u32(f"{arch}.context_length", context_length),
        _kv_u32(f"{arch}.embedding_length", N_EMBD),
        _kv_u32(f"{arch}.block_count", N_LAYER),
        _kv_u32(f"{arch}.feed_forward_length", n_ff),
        _kv_u32(f"{arch}.attention.head_count", N_HEAD),
        _kv_u32(f"{arch}.rope.dimension_count", N_EMBD // N_HEAD),
        _kv_f32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        _kv_str("tokenizer.ggml.model", "llama"),
        _kv_str_array("tokenizer.ggml.tokens", VOCAB),
        _kv_f32_array("tokenizer.ggml.scores", [0.0] * len(VOCAB)),
        _kv_i32_array("tokenizer.ggml.token_type", TOKEN_TYPES),
        _kv_u32("tokenizer.ggml.bos_token_id", 1),
        _kv_u32("tokenizer.ggml.eos_token_id", 2),
        _kv_u32("tokenizer.ggml.unknown_token_id", 0),
    ]
    if chat_template is not None:
        kvs.append(_kv_str("tokenizer.chat_template", chat_template))
    if empty_strings:
        kvs.append(_str("modeld.test.empty_strings")
                   + struct.pack("<IIQ", _ARRAY, _STRING, empty_strings)
                   + bytes(8 * empty_strings))

    shapes = _tensor_shapes(n_ff)
    infos: list[bytes] = []
    offset = 0
    for name, dims in shapes:
        infos.append(
            _str(name)
            + struct.pack("<I", len(dims))
            + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", _GGML_F32, offset)
        )
        offset += math.prod(dims) * 4
        offset += -offset % ALIGNMENT

    embedding_pool = _pool(rng, 1.0)
    weight_pool = _pool(rng, 0.02)
    ones = struct.pack("<f", 1.0) * N_EMBD

    with path.open("wb") as f:
        f.write(GGUF_MAGIC + struct.pack("<IQQ", 3, len(shapes), len(kvs)))
        for kv in kvs:
            f.write(kv)
        for info in infos:
            f.write(info)
        _pad(f)
        for name, dims in shapes:
            n_bytes = math.prod(dims) * 4
            if len(dims) == 1:
                f.write(ones)
            else:
                pool = embedding_pool if name == "token_embd.weight" else weight_pool
                for chunk in _chunks(rng, pool, n_bytes):
                    f.write(chunk)
            _pad(f)
    return path


def _damaged_copy(path: Path, dest: Path | None, suffix: str) -> Path:
    target = dest if dest is not None else path.with_name(f"{path.stem}.{suffix}{path.suffix}")
    shutil.copyfile(path, target)
    return target


def corrupt_header(
    path: Path,
    *,
    what: Literal["counts", "magic", "version"] = "counts",
    dest: Path | None = None,
) -> Path:
    """Copy path with a damaged header and return the copy's path.

    "counts" sets an absurd tensor count (ctransformers segfaults on it), "magic" breaks the
    magic bytes, "version" claims GGUF version 99.
    """
    target = _damaged_copy(path, dest, f"bad-{what}")
    with target.open("r+b") as f:
        if what == "magic":
            f.write(b"GGUX")
        elif what == "version":
            f.seek(4)
            f.write(struct.pack("<I", 99))
        else:
            f.seek(8)
            f.write(struct.pack("<Q", 1 << 40))
    return target


def truncate(path: Path, fraction: float, *, dest: Path | None = None) -> Path:
    """Copy the first `fraction` of path's bytes to a new file and return its path."""
    target = _damaged_copy(path, dest, f"cut{round(fraction * 100)}")
    size = target.stat().st_size
    with target.open("r+b") as f:
        f.truncate(int(size * fraction))
    return target


def gguf_header(size: int) -> bytes:
    """The first bytes of a GGUF file of exactly `size` bytes (at least about 200) that passes
    modeld's header checks: a llama-architecture header and one f32 tensor that the rest of the
    file (any bytes) fills. A runtime could not run it."""
    kvs = [_kv_str("general.architecture", "llama"), _kv_u32("general.alignment", ALIGNMENT)]
    head = GGUF_MAGIC + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(kvs)
    info_size = len(_str("filler")) + 4 + 8 + 4 + 8
    start = len(head) + info_size
    start += -start % ALIGNMENT
    n_floats = (size - start) // 4
    if n_floats < 1:
        raise ValueError(f"a GGUF file needs more than {start} bytes")
    out = head + _str("filler") + struct.pack("<IQIQ", 1, n_floats, _GGML_F32, 0)
    return out + b"\0" * (start - len(out))


def gguf_of_size(size: int, seed: int = 0) -> bytes:
    """The bytes of a `gguf_header` file of exactly `size` bytes, filled with pseudo-random
    bytes that repeat every MiB. For download tests."""
    head = gguf_header(size)
    block = random.Random(seed).randbytes(min(1024 * 1024, size))
    return head + (block * (size // len(block) + 1))[: size - len(head)]


def split_gguf(path: Path, parts: int) -> list[bytes]:
    """The GGUF file at `path` cut into `parts` files in llama.cpp's split format (what
    `llama-gguf-split --split` writes): each part a GGUF of its own with `split.no`,
    `split.count` and `split.tensors.count`; the first part holds every other key."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tensors = list(reader.tensors)
    kvs = [b"".join(p.tobytes() for p in f.parts) for name, f in reader.fields.items()
           if not name.startswith("GGUF.")]
    per = math.ceil(len(tensors) / parts)
    out = []
    for no in range(parts):
        chunk = tensors[no * per:(no + 1) * per]
        split_kvs = [
            _str("split.no") + struct.pack("<IH", 2, no),  # UINT16
            _str("split.count") + struct.pack("<IH", 2, parts),
            _str("split.tensors.count") + struct.pack("<Ii", _INT32, len(tensors)),
        ]
        head = kvs + split_kvs if no == 0 else split_kvs
        infos, blobs, offset = [], [], 0
        for t in chunk:
            fields = t.field.parts
            infos.append(b"".join(p.tobytes() for p in fields[:-1]) + struct.pack("<Q", offset))
            data = t.data.tobytes()
            pad = -len(data) % ALIGNMENT
            blobs.append(data + b"\0" * pad)
            offset += len(data) + pad
        body = GGUF_MAGIC + struct.pack("<IQQ", 3, len(chunk), len(head)) + b"".join(
            head) + b"".join(infos)
        body += b"\0" * (-len(body) % ALIGNMENT)
        out.append(body + b"".join(blobs))
    return out
