"""Hub references: parsing every accepted form, and choosing the file a reference names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.spec import is_valid_id
from supervisor.hub_refs import (
    BadReference,
    ChoiceError,
    HubRef,
    choose_file,
    looks_like_reference,
    model_id_for,
    parse_reference,
    quant_tag,
    split_parts,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(("text", "expected"), [
    ("hf.co/user/repo", HubRef("user/repo")),
    ("hf.co/user/repo:q4_k_m", HubRef("user/repo", quant="Q4_K_M")),
    ("hf.co/user/repo:Q8_0@v1.0", HubRef("user/repo", quant="Q8_0", revision="v1.0")),
    ("hf.co/user/repo@main", HubRef("user/repo", revision="main")),
    ("huggingface.co/User/Repo-GGUF", HubRef("User/Repo-GGUF")),
    ("hf.co/user/repo/sub/m.Q4_K_M.gguf", HubRef("user/repo", file="sub/m.Q4_K_M.gguf")),
    (f"hf.co/user/repo/m.gguf@{COMMIT}", HubRef("user/repo", file="m.gguf", revision=COMMIT)),
    ("https://huggingface.co/user/repo", HubRef("user/repo")),
    ("https://huggingface.co/user/repo/blob/main/m-Q4_K_M.gguf",
     HubRef("user/repo", file="m-Q4_K_M.gguf", revision="main")),
    ("https://huggingface.co/user/repo/resolve/refs%2Fpr%2F1/d/m.gguf?download=true",
     HubRef("user/repo", file="d/m.gguf", revision="refs/pr/1")),
    ("https://hf.co/user/repo/tree/dev", HubRef("user/repo", revision="dev")),
])
def test_forms(text: str, expected: HubRef) -> None:
    assert looks_like_reference(text)
    assert expected == parse_reference(text)


@pytest.mark.parametrize("text", [
    "hf.co/user", "hf.co/user/", "example.com/user/repo", "hf.co/us er/repo", "hf.co/a..b/repo",
    "hf.co/user/repo:Q4-K", "hf.co/user/repo/readme.md", "hf.co/user/repo/../x.gguf",
    "http://huggingface.co/user/repo", "https://evil.example/user/repo/blob/main/m.gguf",
    "https://user:pw@huggingface.co/user/repo", "hf.co/user/repo@", "hf.co/user/repo@a..b",
    "https://huggingface.co/user/repo/commits/main",
])
def test_malformed(text: str) -> None:
    with pytest.raises(BadReference):
        parse_reference(text)


def test_plain_ids_are_not_references() -> None:
    assert not looks_like_reference("tinyllama-1.1b-chat-q4_k_m")


@pytest.mark.parametrize(("name", "tag"), [
    ("tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf", "Q4_K_M"),
    ("Llama-3.2-1B-Instruct-q8_0.gguf", "Q8_0"),
    ("Qwen2.5-0.5B-Instruct-IQ3_XXS.gguf", "IQ3_XXS"),
    ("gemma-3-270m-it-F16.gguf", "F16"),
    ("x/model-bf16-00001-of-00002.gguf", "BF16"),
    ("Qwen2-7B.gguf", None),
])
def test_quant_tag(name: str, tag: str | None) -> None:
    assert tag == quant_tag(name)


FILES = ["README.md", "m.Q4_K_M.gguf", "m.Q8_0.gguf", "m.F16.gguf", "mmproj-m-F16.gguf"]


def test_choice() -> None:
    assert "m.Q4_K_M.gguf" == choose_file(HubRef("u/r"), FILES)
    assert "m.Q8_0.gguf" == choose_file(HubRef("u/r", quant="Q8_0"), FILES)
    assert "m.F16.gguf" == choose_file(HubRef("u/r", file="m.F16.gguf"), FILES)
    # No Q4_K_M: the only model file (the projector is not one).
    assert "m.Q8_0.gguf" == choose_file(HubRef("u/r"), ["m.Q8_0.gguf", "mmproj-F16.gguf"])


SPLIT = ["README.md", "m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf",
         "m.Q8_0.gguf"]


def test_split_choice() -> None:
    """A split set counts as one model, named by its first part, whichever part is named."""
    assert "m-Q4_K_M-00001-of-00002.gguf" == choose_file(HubRef("u/r"), SPLIT)
    assert "m-Q4_K_M-00001-of-00002.gguf" == choose_file(HubRef("u/r", quant="Q4_K_M"), SPLIT)
    assert "m-Q4_K_M-00001-of-00002.gguf" == choose_file(
        HubRef("u/r", file="m-Q4_K_M-00002-of-00002.gguf"), SPLIT)
    assert "m.Q8_0.gguf" == choose_file(HubRef("u/r", quant="Q8_0"), SPLIT)
    assert ["d/x-00001-of-00002.gguf", "d/x-00002-of-00002.gguf"] == split_parts(
        "d/x-00002-of-00002.gguf")
    assert split_parts("x-00003-of-00002.gguf") is None
    assert split_parts("x.Q4_K_M.gguf") is None


def test_choice_errors() -> None:
    with pytest.raises(ChoiceError, match="its quantizations: F16, Q4_K_M, Q8_0") as missing:
        choose_file(HubRef("u/r", quant="Q2_K"), FILES)
    assert "hub_quant_not_found" == missing.value.code
    with pytest.raises(ChoiceError, match=r"a\.Q4_K_M\.gguf, b\.Q4_K_M\.gguf") as twice:
        choose_file(HubRef("u/r"), ["a.Q4_K_M.gguf", "b.Q4_K_M.gguf"])
    assert "hub_quant_ambiguous" == twice.value.code
    with pytest.raises(ChoiceError, match="from: Q5_K_M, Q8_0") as no_default:
        choose_file(HubRef("u/r"), ["m.Q8_0.gguf", "m.Q5_K_M.gguf"])
    assert "hub_quant_ambiguous" == no_default.value.code
    with pytest.raises(ChoiceError) as none:
        choose_file(HubRef("u/r"), ["README.md", "model.safetensors"])
    assert "hub_no_gguf" == none.value.code
    with pytest.raises(ChoiceError, match=r"m-Q4_K_M-00002-of-00003\.gguf") as split:
        choose_file(HubRef("u/r"), ["m-Q4_K_M-00001-of-00003.gguf",
                                    "m-Q4_K_M-00003-of-00003.gguf"])
    assert "hub_split_incomplete" == split.value.code
    with pytest.raises(ChoiceError) as absent:
        choose_file(HubRef("u/r", file="x.gguf"), FILES)
    assert "hub_file_not_found" == absent.value.code


def test_model_ids() -> None:
    assert "hf-user-repo-gguf-q4_k_m" == model_id_for("User/Repo-GGUF", "m.Q4_K_M.gguf")
    assert "hf-u-r-model" == model_id_for("u/r", "dir/model.gguf")
    assert "hf-u-r-model" == model_id_for("u/r", "model-00001-of-00002.gguf")
    assert model_id_for("u/r", "m.gguf", "a") != model_id_for("u/r", "m.gguf", "b")


NAMES = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,40}[A-Za-z0-9_]", fullmatch=True).filter(
    lambda s: ".." not in s and "--" not in s)


@given(user=NAMES, repo=NAMES, quant=st.sampled_from(["q4_k_m", "Q8_0", "IQ2_XS", "f16"]),
       revision=st.one_of(st.none(), st.from_regex(r"[a-z0-9][a-z0-9._/-]{0,20}",
                                                   fullmatch=True)))
def test_canonical_round_trip(user: str, repo: str, quant: str, revision: str | None) -> None:
    if revision is not None and ".." in revision:
        return
    ref = HubRef(f"{user}/{repo}", quant=quant.upper(), revision=revision)
    assert ref == parse_reference(ref.canonical())
    assert ref == parse_reference(ref.canonical().replace("hf.co/", "huggingface.co/"))
    model_id = model_id_for(ref.repo, f"x.{quant}.gguf", ref.canonical())
    assert is_valid_id(model_id)
