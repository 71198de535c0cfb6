"""What a model is: a catalog entry or a custom record. Immutable; updates make a new one."""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse

import attrs

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

MODEL_TYPES = frozenset({"UNKNOWN", "BALANCED", "SPEED", "ACCURACY"})
# ctransformers 0.2.27 model types; any GGUF file goes to its llama loader.
RUNTIME_TYPES = frozenset(
    {"llama", "gpt2", "gptj", "gpt_neox", "dolly-v2", "starcoder", "falcon", "mpt", "replit"}
)
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
# The end of a split GGUF part's name (llama.cpp's `-00001-of-00003`): the parts of model `x`
# are `x-0000k-of-0000n.gguf`, so no model id may end like that.
SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")


def is_valid_id(model_id: str) -> bool:
    """True when `model_id` is safe to use as a file name under the storage dir."""
    return (ID_PATTERN.fullmatch(model_id) is not None and ".." not in model_id
            and SPLIT_SUFFIX.search(model_id) is None)


def check_url(url: str, *, allow_http: bool) -> str | None:
    """Return why `url` may not be downloaded from, or None when it may.

    Only http(s) with a host, no credentials, a port in range, at most 4096 characters, and
    no whitespace or control characters (urllib drops some silently: what is checked must be
    what is fetched).
    """
    if len(url) > 4096:
        return "at most 4096 characters"
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        return "must not contain whitespace or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return "the URL cannot be parsed (or its port is not a number between 0 and 65535)"
    if parts.scheme == "http" and not allow_http:
        return "plain http is refused; use https, or set [download] allow_http = true"
    if parts.scheme not in ("http", "https"):
        return "only https (or http with [download] allow_http) URLs are allowed"
    if not parts.hostname:
        return "the URL has no host"
    if parts.username is not None or parts.password is not None:
        return "credentials in URLs are refused"
    return None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


SCORE_COUNTERS = ("priority", "reference", "reuse", "searched", "update")


@attrs.frozen
class ModelScore:
    """How often clients used a model (Pieces' Score): counters of POST /model/{id}/scores/
    increment. `manual` sums every increment; modeld records no automatic events."""

    manual: int = 0
    automatic: int = 0
    priority: int = 0
    reference: int = 0
    reuse: int = 0
    searched: int = 0
    update: int = 0

    def plus(self, counters: tuple[str, ...]) -> ModelScore:
        changes = {name: getattr(self, name) + 1 for name in counters}
        return attrs.evolve(self, manual=self.manual + len(counters), **changes)


@attrs.frozen
class SplitPart:
    """One part of a split GGUF model (`name-0000k-of-0000n.gguf`): where its bytes are and
    what verifies them."""

    file: str
    url: str
    sha256: str
    size: int


def _to_parts(value: object) -> tuple[SplitPart, ...]:
    """A record's `parts` (a JSON list of objects) or SplitParts, as a tuple."""
    if not isinstance(value, list | tuple):
        raise TypeError("parts must be a list")
    return tuple(p if isinstance(p, SplitPart) else SplitPart(**p) for p in value)


@attrs.frozen
class ModelSpec:
    id: str
    name: str
    url: str | None = None
    sha256: str | None = None
    size: int | None = None
    model_type: str = "llama"
    version: str = "1"
    description: str | None = None
    quantization: str | None = None
    foundation: str | None = None
    type: str = "BALANCED"
    usage: str = "CODE_CONVERSATION"
    ram: int | None = None
    context_length: int | None = None
    # "auto", "llama.cpp" or "ctransformers"; None: [runtime] default_runtime.
    runtime: str | None = None
    # Requests a loaded llama.cpp model serves at once; None: [runtime] parallel.
    parallel: int | None = None
    # How long it stays loaded when idle after a load on first use ("15m", "0", "-1");
    # None: [runtime] keep_alive.
    keep_alive: str | None = None
    custom: bool = False
    created: dt.datetime = attrs.field(factory=utcnow)
    score: ModelScore = ModelScore()
    # A Hub reference (hf.co/...), and what it was pinned to: the commit and the file in it.
    source: str | None = None
    revision: str | None = None
    file: str | None = None
    # A split model's parts, in order (empty: one file). `url`, `sha256` and `file` are then
    # the first part's, `size` the whole set's.
    parts: tuple[SplitPart, ...] = attrs.field(default=(), converter=_to_parts)
