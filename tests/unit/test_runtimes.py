from pathlib import Path

import pytest

from actors.backends.llamacpp import load_reason, padded_context
from actors.gguf import architecture_from_prefix
from actors.runtimes import RuntimeRefused, choose_runtime, preview_runtime
from tests.gguf_factory import write_tiny_llama


@pytest.mark.parametrize(
    ("requested", "architecture", "expected"),
    [
        ("auto", "llama", "llama.cpp"),
        ("auto", "gemma3", "llama.cpp"),
        ("auto", "qwen3", "llama.cpp"),
        ("auto", None, "llama.cpp"),
        ("ctransformers", "llama", "ctransformers"),
        ("llama.cpp", "llama", "llama.cpp"),
        ("llama.cpp", "phi3", "llama.cpp"),
    ],
)
def test_choose_runtime(requested: str, architecture: str | None, expected: str) -> None:
    assert expected == choose_runtime(requested, architecture)


@pytest.mark.parametrize(
    ("requested", "architecture", "words"),
    [
        ("ctransformers", "gemma3", "'gemma3' model, which ctransformers does not run"),
        ("auto", "notanarch", "'notanarch' model, which no runtime"),
        ("llama.cpp", "notanarch", "'notanarch' model, which llama.cpp does not run"),
        ("vllm", "llama", "unknown runtime 'vllm'"),
    ],
)
def test_choose_runtime_refuses(requested: str, architecture: str, words: str) -> None:
    with pytest.raises(RuntimeRefused, match=words):
        choose_runtime(requested, architecture)
    assert None is preview_runtime(requested, architecture)


def test_split_models_run_only_in_llama_cpp() -> None:
    assert "llama.cpp" == choose_runtime("auto", "llama", split=True)
    assert "llama.cpp" == choose_runtime("llama.cpp", "llama", split=True)
    with pytest.raises(RuntimeRefused, match=r"split GGUF file.*ctransformers cannot load"):
        choose_runtime("ctransformers", "llama", split=True)
    assert None is preview_runtime("ctransformers", "llama", split=True)
    with pytest.raises(RuntimeRefused, match="'notanarch' model split"):
        choose_runtime("auto", "notanarch", split=True)


def test_architecture_from_prefix(tmp_path: Path) -> None:
    data = write_tiny_llama(tmp_path / "m.gguf", architecture="gemma3").read_bytes()
    assert "gemma3" == architecture_from_prefix(data[:4096])
    assert None is architecture_from_prefix(data[:30])
    assert None is architecture_from_prefix(b"not a gguf file at all, just text")
    assert None is architecture_from_prefix(b"GGUF" + bytes(range(256)) * 4)


def test_load_reason_names_llama_cpp_reason() -> None:
    log = (
        "0.00.013.148 E gguf_init_from_reader: this GGUF file is version 221517104 but this "
        "software only supports up to version 3\n"
        "0.00.013.155 E gguf_init_from_reader: failed to read header\n"
        "0.00.013.203 E llama_model_load: error loading model: llama_model_loader: failed to "
        "load model from /tmp/garb.gguf\n"
        "0.00.013.220 E common_fit_params: encountered an error while trying to fit params\n"
        "0.00.013.155 E gguf_init_from_reader: failed to read header\n"
        "0.00.013.718 E srv          init: exiting due to model loading error\n"
        "0.00.013.719 I some info line\n"
    )
    reason = load_reason(log)
    assert reason.startswith("gguf_init_from_reader: this GGUF file is version 221517104")
    assert 1 == reason.count("failed to read header")
    assert "exiting" not in reason and "info line" not in reason


def test_padded_context() -> None:
    assert [256, 256, 512, 4096] == [padded_context(n) for n in (1, 256, 257, 4096)]
