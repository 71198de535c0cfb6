"""References to GGUF files on the Hugging Face Hub, parsed and chosen without any I/O.

Accepted forms (each with an optional `@{revision}`: a branch, tag or commit):

    hf.co/{user}/{repo}                     the default quantization (see `choose_file`)
    hf.co/{user}/{repo}:{quant}             the GGUF whose quantization tag is {quant}
    hf.co/{user}/{repo}/{path/file.gguf}    that file
    https://huggingface.co/{user}/{repo}[/blob|/resolve/{revision}/{path/file.gguf}]

`huggingface.co/` may stand for `hf.co/`, with or without `https://`.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse

import attrs

DEFAULT_QUANT = "Q4_K_M"
HOSTS = ("hf.co", "huggingface.co", "www.huggingface.co")
# The Hub's own rule for names (huggingface_hub's validate_repo_id): A-Z a-z 0-9 . _ -,
# at most 96 characters, no `--` or `..`, not starting or ending with `.` or `-`.
_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
_REVISION = re.compile(r"[A-Za-z0-9._/-]{1,255}")
_QUANT = re.compile(r"[A-Za-z0-9_]{1,32}")
# A quantization tag in a file name: Q4_K_M, q8_0, IQ3_XXS, TQ1_0, F16, BF16, FP32 ...
_TAG = re.compile(r"(?<![A-Za-z0-9])((?:T|I)?Q[0-9]+(?:_[A-Za-z0-9]+)*|B?F(?:16|32)|FP(?:16|32))"
                  r"(?![A-Za-z0-9])", re.IGNORECASE)
_SPLIT = re.compile(r"-\d{5}-of-\d{5}$")


class BadReference(ValueError):
    """The text is not a Hub reference modeld understands; the message says what to type."""


class ChoiceError(ValueError):
    """The reference does not name exactly one GGUF file of the repository."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


@attrs.frozen
class HubRef:
    repo: str  # "user/repo"
    quant: str | None = None  # upper-case
    file: str | None = None  # a path inside the repository
    revision: str | None = None  # None: the repository's default branch

    def canonical(self) -> str:
        """The reference in its `hf.co/...` form (the quantization upper-case)."""
        text = f"hf.co/{self.repo}"
        if self.file is not None:
            text += f"/{self.file}"
        elif self.quant is not None:
            text += f":{self.quant}"
        if self.revision is not None:
            text += f"@{self.revision}"
        return text


def looks_like_reference(text: str) -> bool:
    """True when `text` is meant as a Hub reference (model ids never hold `/`)."""
    lowered = text.strip().lower()
    return lowered.startswith(tuple(f"{h}/" for h in HOSTS)) or lowered.startswith(
        ("https://", "http://"))


def parse_reference(text: str) -> HubRef:
    """Parse one reference. Raises BadReference naming what is wrong."""
    original = text
    text = text.strip()
    if len(text) > 2048 or any(ch.isspace() or ord(ch) < 0x20 for ch in text):
        raise BadReference(f"{original!r} is not a Hub reference: too long or has spaces")
    if "://" in text:
        return _parse_url(text)
    host, _, rest = text.partition("/")
    if host.lower() not in HOSTS:
        raise BadReference(
            f"{text!r} is not a Hub reference: write hf.co/USER/REPO[:QUANT][@REVISION] or "
            "hf.co/USER/REPO/FILE.gguf")
    rest, at, revision = rest.rpartition("@") if "@" in rest else (rest, "", "")
    parts = rest.split("/")
    if len(parts) < 2:
        raise BadReference(f"{text!r} names no repository: write hf.co/USER/REPO")
    user, repo = parts[0], parts[1]
    quant = None
    if len(parts) == 2 and ":" in repo:
        repo, _, quant = repo.partition(":")
        if not _QUANT.fullmatch(quant):
            raise BadReference(f"{text!r}: the quantization {quant!r} is not a tag like "
                                 "Q4_K_M")
    path = "/".join(parts[2:]) or None
    return _checked(text, user, repo, quant=quant, file=path,
                    revision=revision if at else None)


def _parse_url(text: str) -> HubRef:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "https" or (parts.hostname or "") not in HOSTS or parts.port or (
            parts.username or parts.password):
        raise BadReference(f"{text!r} is not a Hugging Face URL: expected "
                             "https://huggingface.co/USER/REPO[/blob/REVISION/FILE.gguf]")
    segments = [urllib.parse.unquote(s) for s in parts.path.split("/") if s]
    if len(segments) < 2:
        raise BadReference(f"{text!r} names no repository")
    user, repo, rest = segments[0], segments[1], segments[2:]
    if not rest:
        return _checked(text, user, repo)
    if rest[0] in ("blob", "resolve") and len(rest) >= 3:
        return _checked(text, user, repo, file="/".join(rest[2:]), revision=rest[1])
    if rest[0] == "tree" and len(rest) == 2:
        return _checked(text, user, repo, revision=rest[1])
    raise BadReference(f"{text!r}: expected a /blob/ or /resolve/ URL of a .gguf file")


def _checked(text: str, user: str, repo: str, *, quant: str | None = None,
             file: str | None = None, revision: str | None = None) -> HubRef:
    for name in (user, repo):
        if not _NAME.fullmatch(name) or ".." in name or "--" in name:
            raise BadReference(f"{text!r}: {name!r} is not a valid Hub user or repository "
                                 "name")
    if file is not None:
        pieces = file.split("/")
        if not file.lower().endswith(".gguf") or any(p in ("", ".", "..") for p in pieces):
            raise BadReference(f"{text!r}: {file!r} is not the path of a .gguf file")
        if any(ord(ch) < 0x20 or ch in "\\?#" for ch in file):
            raise BadReference(f"{text!r}: the file path has characters modeld refuses")
    if revision is not None and (not _REVISION.fullmatch(revision) or ".." in revision):
        raise BadReference(f"{text!r}: {revision!r} is not a branch, tag or commit")
    return HubRef(repo=f"{user}/{repo}", quant=quant.upper() if quant else None, file=file,
                  revision=revision)


def quant_tag(path: str) -> str | None:
    """The quantization tag of a GGUF file name, upper-case (`Q4_K_M`), or None."""
    stem = _SPLIT.sub("", path.rsplit("/", 1)[-1].removesuffix(".gguf").removesuffix(".GGUF"))
    found = _TAG.findall(stem)
    return found[-1].upper() if found else None


_PART = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


def is_split_part(path: str) -> bool:
    return _PART.search(path.rsplit("/", 1)[-1]) is not None


def split_parts(path: str) -> list[str] | None:
    """The names of every part of the split set `path` is a part of (in order), or None when
    `path` is not a split part (`name-0000k-of-0000n.gguf`, 1 <= k <= n)."""
    found = _PART.search(path)
    if found is None or "/" in path[found.start():]:
        return None
    number, count = int(found[1]), int(found[2])
    if not 1 <= number <= count:
        return None
    stem = path[: found.start()]
    return [f"{stem}-{k:05d}-of-{count:05d}.gguf" for k in range(1, count + 1)]


def model_files(paths: list[str]) -> list[str]:
    """The repository's GGUF models: `.gguf` files that are not a vision projector
    (`mmproj`); a split set counts once, as its first part."""
    out = []
    for p in paths:
        if not p.lower().endswith(".gguf") or p.rsplit("/", 1)[-1].lower().startswith("mmproj"):
            continue
        parts = split_parts(p)
        if parts is None or parts[0] == p:
            out.append(p)
    return out


def choose_file(ref: HubRef, paths: list[str]) -> str:
    """The one file of `paths` (a repository's file list) that `ref` names.

    A split set is named by its first part (`name-00001-of-0000n.gguf`), whichever of its parts
    the reference names; `split_parts` gives the others. Raises ChoiceError (code
    `hub_file_not_found`, `hub_no_gguf`, `hub_quant_not_found`, `hub_quant_ambiguous`,
    `hub_split_incomplete`) with the choices listed.
    """
    where = ref.canonical()
    if ref.file is not None:
        if ref.file not in paths:
            raise ChoiceError(f"{ref.repo} has no file {ref.file!r} ({where})",
                              code="hub_file_not_found")
        parts = split_parts(ref.file)
        return _whole_set(parts, paths, where) if parts else ref.file
    candidates = model_files(paths)
    if not candidates:
        raise ChoiceError(f"{ref.repo} has no GGUF file ({where})", code="hub_no_gguf")
    tags = sorted({t for t in map(quant_tag, candidates) if t})
    wanted = ref.quant or DEFAULT_QUANT
    matching = [p for p in candidates if quant_tag(p) == wanted]
    if len(matching) == 1:
        parts = split_parts(matching[0])
        return _whole_set(parts, paths, where) if parts else matching[0]
    if len(matching) > 1:
        raise ChoiceError(
            f"{where} matches {len(matching)} files: {', '.join(matching)}; name one as "
            f"hf.co/{ref.repo}/FILE.gguf", code="hub_quant_ambiguous")
    if ref.quant is None and len(candidates) == 1:
        parts = split_parts(candidates[0])
        return _whole_set(parts, paths, where) if parts else candidates[0]
    choices = ", ".join(tags) if tags else ", ".join(candidates)
    if ref.quant is not None:
        raise ChoiceError(f"{ref.repo} has no {ref.quant} file ({where}); its quantizations: "
                          f"{choices}", code="hub_quant_not_found")
    raise ChoiceError(f"{ref.repo} has no {DEFAULT_QUANT} file and several GGUF files; "
                      f"choose one as hf.co/{ref.repo}:QUANT, from: {choices}",
                      code="hub_quant_ambiguous")


def _whole_set(parts: list[str], paths: list[str], where: str) -> str:
    """The first part of a split set whose every part is in `paths`."""
    absent = [p for p in parts if p not in paths]
    if absent:
        raise ChoiceError(f"{where} is a split GGUF file whose parts {', '.join(absent)} are "
                          "not in the repository", code="hub_split_incomplete")
    return parts[0]


def model_id_for(repo: str, file: str, suffix_seed: str | None = None) -> str:
    """A stable, valid model id for a Hub file: `hf-{user}-{repo}-{quant}` lower-case (the
    file's name when it has no quantization tag); with `suffix_seed`, 8 hex digits of its
    sha256 are added (another reference to the same file name)."""
    what = quant_tag(file) or _SPLIT.sub("", file.rsplit("/", 1)[-1].removesuffix(".gguf"))
    base = re.sub(r"[^a-z0-9_-]+", "-", f"hf-{repo}-{what}".lower().replace("/", "-"))
    base = re.sub(r"-{2,}", "-", base).strip("-_")
    suffix = "" if suffix_seed is None else "-" + hashlib.sha256(
        suffix_seed.encode()).hexdigest()[:8]
    return base[: 128 - len(suffix)].rstrip("-_") + suffix
