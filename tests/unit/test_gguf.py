import os
import struct
from pathlib import Path

import pytest

from actors.gguf import GGUFInfo, GGUFInvalid, inspect_gguf
from actors.gguf_header import (
    MAX_ARRAY,
    MAX_HEADER,
    MAX_KVS,
    MAX_STRING,
    MAX_STRINGS,
    MAX_TENSORS,
    HeaderLimit,
    read_header,
)
from actors.load_checks import RememberedInspect
from actors.memory import MemoryShape
from tests.gguf_factory import corrupt_header, truncate, write_tiny_llama

TINY_PARAMETERS = 2 * 64 * 260 + 64 + 2 * (2 * 64 + 4 * 64 * 64 + 3 * 64 * 128)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "tiny.gguf", chat_template="{{ messages }}")


def test_tiny_model_metadata(tiny: Path) -> None:
    expected = GGUFInfo(
        architecture="llama",
        context_length=128,
        embedding_length=64,
        block_count=2,
        vocab_size=260,
        quantization="F32",
        parameter_count=TINY_PARAMETERS,
        chat_template="{{ messages }}",
        name="tiny-llama",
        file_size=tiny.stat().st_size,
        # f32 weights; 2 layers of K and V, 4 heads of 16 values each (no separate KV heads)
        memory=MemoryShape(tensor_bytes=TINY_PARAMETERS * 4, layers=2, embedding=64,
                           kv_width=128, vocab=260),
    )
    assert expected == inspect_gguf(tiny)


def test_no_chat_template_and_context_length_from_file(tmp_path: Path) -> None:
    info = inspect_gguf(write_tiny_llama(tmp_path / "m.gguf", context_length=256))
    assert info.chat_template is None
    assert 256 == info.context_length


@pytest.mark.parametrize(
    ("what", "words"),
    [("counts", "claims"), ("magic", "not a GGUF file"), ("version", "version 99")],
)
def test_damaged_header_refused(tiny: Path, what: str, words: str) -> None:
    damaged = corrupt_header(tiny, what=what)  # type: ignore[arg-type]
    with pytest.raises(GGUFInvalid, match=words):
        inspect_gguf(damaged)


def test_absurd_kv_count_refused(tiny: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "kv.gguf"
    data = bytearray(tiny.read_bytes())
    data[16:24] = struct.pack("<Q", 1 << 50)
    damaged.write_bytes(bytes(data))
    with pytest.raises(GGUFInvalid, match="metadata entries"):
        inspect_gguf(damaged)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
def test_truncated_file_refused(tiny: Path, fraction: float) -> None:
    with pytest.raises(GGUFInvalid, match="truncated"):
        inspect_gguf(truncate(tiny, fraction))


def test_file_cut_inside_the_header_refused(tiny: Path) -> None:
    with pytest.raises(GGUFInvalid, match="damaged"):
        inspect_gguf(truncate(tiny, 0.01))


def test_reader_failure_refused(tiny: Path, tmp_path: Path) -> None:
    # A metadata value type that does not exist: the gguf reader raises, we report.
    data = bytearray(tiny.read_bytes())
    key = b"general.name"
    type_at = data.index(key) + len(key)
    data[type_at : type_at + 4] = struct.pack("<I", 77)
    damaged = tmp_path / "type.gguf"
    damaged.write_bytes(bytes(data))
    with pytest.raises(GGUFInvalid, match="damaged"):
        inspect_gguf(damaged)


def test_missing_architecture_refused(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "m.gguf", architecture=None)
    with pytest.raises(GGUFInvalid, match=r"general\.architecture"):
        inspect_gguf(path)


def test_architecture_no_runtime_runs_refused(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "m.gguf", architecture="notanarch")
    with pytest.raises(GGUFInvalid, match="'notanarch' model"):
        inspect_gguf(path)


def test_architecture_llama_cpp_runs_accepted(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "m.gguf", architecture="falcon")
    assert "falcon" == inspect_gguf(path).architecture


def test_empty_file_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.touch()
    with pytest.raises(GGUFInvalid, match="empty"):
        inspect_gguf(empty)


def test_short_file_refused(tmp_path: Path) -> None:
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(GGUFInvalid, match="too short"):
        inspect_gguf(short)


@pytest.mark.parametrize("seed", range(3))
def test_random_bytes_refused(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "random.gguf"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(GGUFInvalid):
        inspect_gguf(path)


def test_random_bytes_behind_valid_magic_refused(tmp_path: Path) -> None:
    path = tmp_path / "random.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + os.urandom(4096))
    with pytest.raises(GGUFInvalid):
        inspect_gguf(path)


def test_missing_file_is_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        inspect_gguf(tmp_path / "nope.gguf")


def test_quantization_falls_back_to_dominant_tensor_type(tiny: Path, tmp_path: Path) -> None:
    data = bytearray(tiny.read_bytes())
    key = b"general.file_type"
    value_at = data.index(key) + len(key) + 4
    data[value_at : value_at + 4] = struct.pack("<I", 1024)  # GUESSED
    path = tmp_path / "guessed.gguf"
    path.write_bytes(bytes(data))
    assert "F32" == inspect_gguf(path).quantization


# -- caps on untrusted headers ------------------------------------------------------------------


def _head(kvs: list[bytes], tensors: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, len(kvs)) + b"".join(kvs)


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def _string_array(name: str, count: int, each: int = 0) -> bytes:
    item = struct.pack("<Q", each) + b"x" * each
    return _key(name) + struct.pack("<IIQ", 9, 8, count) + item * count


def test_two_million_empty_strings_refused(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "m.gguf", empty_strings=2_000_000)
    with pytest.raises(GGUFInvalid, match="2000000 entries, more than the 1048576"):
        inspect_gguf(path)


def test_a_real_sized_vocabulary_is_read(tmp_path: Path) -> None:
    # Gemma 3's 262,144 tokens, as strings of a vocabulary's typical length
    path = write_tiny_llama(tmp_path / "m.gguf", empty_strings=262_144)
    assert "llama" == inspect_gguf(path).architecture


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (_head([_key("k") + struct.pack("<IIQ", 9, 6, MAX_ARRAY + 1)]),
         f"claims {MAX_ARRAY + 1} entries"),
        (_head([_key("k") + struct.pack("<IQ", 8, MAX_STRING + 1)]),
         f"more than the {MAX_STRING}"),
        (_head([_key("x" * (MAX_STRING + 1))]), f"more than the {MAX_STRING}"),
        (_head([_string_array("a", MAX_ARRAY), _string_array("b", MAX_ARRAY),
                _string_array("c", 1)]), f"more than {MAX_STRINGS} strings"),
        (b"GGUF" + struct.pack("<IQQ", 3, 1, MAX_KVS + 1), f"more than the {MAX_KVS}"),
        (b"GGUF" + struct.pack("<IQQ", 3, MAX_TENSORS + 1, 1), f"more than the {MAX_TENSORS}"),
    ],
    ids=["array", "string", "key", "all-strings", "kvs", "tensors"],
)
def test_header_caps(data: bytes, words: str) -> None:
    with pytest.raises(HeaderLimit, match=words):
        read_header(data)


def test_header_size_cap() -> None:
    # Byte arrays of 1 MiB each, every one within the caps, more than MAX_HEADER in all
    n = MAX_HEADER // MAX_ARRAY + 1
    one = struct.pack("<IIQ", 9, 0, MAX_ARRAY) + bytes(MAX_ARRAY)
    data = _head([_key(f"k{i}") + one for i in range(n)])
    with pytest.raises(HeaderLimit, match=f"larger than {MAX_HEADER} bytes"):
        read_header(data)


def test_a_file_is_parsed_once_until_another_takes_its_place(tiny: Path) -> None:
    parsed: list[Path] = []

    def counting(path: Path) -> GGUFInfo:
        parsed.append(path)
        return inspect_gguf(path)

    inspect = RememberedInspect(counting)
    first = inspect(tiny)
    assert first == inspect(tiny)
    assert 1 == len(parsed)
    # A new file renamed over it (as publishing does) is a new file: parsed again.
    other = write_tiny_llama(tiny.with_name("other.gguf"), architecture="qwen2")
    os.replace(other, tiny)
    assert "qwen2" == inspect(tiny).architecture
    assert 2 == len(parsed)
    tiny.unlink()
    with pytest.raises(FileNotFoundError):
        inspect(tiny)
