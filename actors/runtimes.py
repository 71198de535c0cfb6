"""Which runtime runs a model: the choice between llama.cpp and ctransformers.

Pure data and one function, used by the daemon (no runtime is imported here). The choice is
made from the file's GGUF header (`general.architecture`), never from a name the user gives.
"""

from __future__ import annotations

LLAMA_CPP = "llama.cpp"
CTRANSFORMERS = "ctransformers"
AUTO = "auto"
RUNTIMES = (LLAMA_CPP, CTRANSFORMERS)
CHOICES = (AUTO, *RUNTIMES)

# The model architectures in llama.cpp's architecture table as built into xllamacpp
# 2026.10.11549 (vision projectors, which are not models, left out).
LLAMA_CPP_ARCHITECTURES = frozenset({
    "afmoe", "apertus", "arcee", "arctic", "arwkv7", "baichuan", "bailingmoe", "bailingmoe2",
    "bert", "bitnet", "bloom", "chameleon", "chatglm", "codeshell", "cogvlm", "cohere2",
    "command-r", "dbrx", "deci", "deepseek", "deepseek2", "deepseek2-ocr", "dots1", "dream",
    "ernie4_5", "ernie4_5-moe", "eurobert", "exaone", "exaone-moe", "exaone4", "falcon",
    "falcon-h1", "gemma", "gemma-embedding", "gemma2", "gemma3", "gemma3n", "gemma4", "glm-dsa",
    "glm4", "glm4moe", "gpt-oss", "gpt2", "gptj", "gptneox", "granite", "granitehybrid",
    "granitemoe", "grok", "grovemoe", "hunyuan-dense", "hunyuan-moe", "hunyuan_vl", "internlm2",
    "jais", "jais2", "jamba", "jina-bert-v2", "jina-bert-v3", "kimi-linear", "lfm2", "lfm2moe",
    "llada", "llada-moe", "llama", "llama-embed", "llama4", "maincoder", "mamba", "mamba2",
    "mimo2", "minicpm", "minicpm3", "minimax-m2", "mistral3", "mistral4", "modern-bert", "mpt",
    "nemotron", "nemotron_h", "nemotron_h_moe", "neo-bert", "nomic-bert", "nomic-bert-moe",
    "olmo", "olmo2", "olmoe", "openelm", "orion", "paddleocr", "pangu-embedded", "phi2", "phi3",
    "phimoe", "plamo", "plamo2", "plamo3", "plm", "qwen", "qwen2", "qwen2moe", "qwen2vl", "qwen3",
    "qwen35", "qwen35moe", "qwen3moe", "qwen3next", "qwen3vl", "qwen3vlmoe", "refact", "rnd1",
    "rwkv6", "rwkv6qwen2", "rwkv7", "seed_oss", "smallthinker", "smollm3", "stablelm",
    "starcoder", "starcoder2", "step35", "t5", "t5encoder", "wavtokenizer-dec", "xverse",
})
# ctransformers 0.2.27 sends every GGUF file to its llama loader, which runs only llama.
CTRANSFORMERS_ARCHITECTURES = frozenset({"llama"})


class RuntimeRefused(Exception):
    """No runtime (or not the one asked for) runs this architecture; the message says which."""


def runs(runtime: str, architecture: str) -> bool:
    if runtime == LLAMA_CPP:
        return architecture in LLAMA_CPP_ARCHITECTURES
    if runtime == CTRANSFORMERS:
        return architecture in CTRANSFORMERS_ARCHITECTURES
    return False


def runnable(architecture: str) -> bool:
    """True when some runtime runs this architecture."""
    return any(runs(r, architecture) for r in RUNTIMES)


def preview_runtime(requested: str, architecture: str | None, *,
                    split: bool = False) -> str | None:
    """The runtime that would run the model, or None when none would."""
    try:
        return choose_runtime(requested, architecture, split=split)
    except RuntimeRefused:
        return None


def choose_runtime(requested: str, architecture: str | None, *, split: bool = False) -> str:
    """The runtime that runs a model of `architecture` when `requested` ("auto", "llama.cpp"
    or "ctransformers") is asked for. "auto" is llama.cpp for every architecture it runs.
    A `split` model (several GGUF parts) runs only in llama.cpp: ctransformers reads one file.

    Raises RuntimeRefused when the requested runtime (or, for "auto", every runtime) cannot run
    the architecture. A file whose architecture is not known yet counts as llama.
    """
    arch = architecture or "llama"
    if split and requested == CTRANSFORMERS:
        raise RuntimeRefused(
            "the model is a split GGUF file (several parts), which ctransformers cannot load; "
            "set the model's runtime to 'llama.cpp' or 'auto'"
        )
    if split and requested == AUTO and not runs(LLAMA_CPP, arch):
        raise RuntimeRefused(
            f"the file is a {arch!r} model split in several parts: llama.cpp does not run "
            "it, and ctransformers cannot load split files"
        )
    if requested == AUTO:
        for runtime in RUNTIMES:
            if runs(runtime, arch):
                return runtime
        raise RuntimeRefused(
            f"the file is a {arch!r} model, which no runtime of modeld runs "
            "(llama.cpp runs the architectures of its table, ctransformers only llama); "
            "choose a GGUF build of a model llama.cpp supports"
        )
    if requested not in RUNTIMES:
        raise RuntimeRefused(
            f"unknown runtime {requested!r}; use one of {', '.join(CHOICES)}"
        )
    if not runs(requested, arch):
        hint = " or 'auto'" if runnable(arch) else ""
        raise RuntimeRefused(
            f"the file is a {arch!r} model, which {requested} does not run; set the "
            f"model's runtime to another one{hint}"
        )
    return requested
