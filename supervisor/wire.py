"""The one converter between modeld's attrs objects and the Pieces JSON shapes (camelCase).

Outgoing: `ModelView` -> Model JSON, `Progress` -> ModelDownloadProgress JSON.
Incoming: Model / SeededModel bodies -> `ModelBody`, strictly typed, unknown keys refused,
errors carrying the field path (cattrs `transform_error`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from actors.keepalive import parse_keep_alive
from actors.memory import resident_bytes
from actors.messages import ModelView, Progress
from actors.runtimes import CHOICES as RUNTIME_CHOICES
from actors.spec import (
    MODEL_TYPES,
    RUNTIME_TYPES,
    SCORE_COUNTERS,
    SHA256_PATTERN,
    ModelSpec,
    check_url,
)
from actors.state import flags
from supervisor.enums import FOUNDATIONS, USAGES
from supervisor.units import format_bytes

MAX_BYTES = 2**63 - 1  # sizes are stored and sent as JSON integers that every client can read


class BodyError(Exception):
    """The request body does not fit; the message names the field path."""


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


# --- outgoing shapes --------------------------------------------------------------------


@attrs.frozen
class ByteDescriptor:
    value: int
    readable: str


@attrs.frozen
class Timestamp:
    value: str


@attrs.frozen
class MaxTokens:
    total: int
    input: int | None = None
    output: int | None = None


@attrs.frozen
class ModelOut:
    id: str
    name: str
    version: str
    cloud: bool
    created: Timestamp
    type: str
    usage: str
    downloaded: bool
    downloading: bool
    loaded: bool
    custom: bool
    cpu: bool
    state: str
    partial_bytes: int
    model_type: str
    bytes: ByteDescriptor | None = None
    ram: ByteDescriptor | None = None
    foundation: str | None = None
    quantization: str | None = None
    description: str | None = None
    max_tokens: MaxTokens | None = None
    parameters: float | None = None
    url: str | None = None
    sha256: str | None = None
    error: str | None = None
    load_seconds: float | None = None
    unique: str | None = None
    score: ScoreOut | None = None
    evicted: list[str] | None = None  # a load's answer: the models unloaded to make room
    runtime: str | None = None
    architecture: str | None = None
    parallel: int | None = None
    pid: int | None = None  # the loaded model's worker process
    resident_bytes: int | None = None  # its resident memory now
    source: str | None = None  # a Hub reference, and the commit and file it is pinned to
    revision: str | None = None
    file: str | None = None
    parts: list[str] | None = None  # a split GGUF set's files, in order (`file` is the first)
    keep_alive: str | None = None  # the model's own keep-alive, when it has one
    expires_at: str | None = None  # when it is unloaded if it stays idle (ISO 8601)
    memory_estimate: int | None = None  # bytes it takes loaded, estimated from its header
    # A source-backed model whose reference now names another file (supervisor/hub_updates.py)
    update_available: bool | None = None
    update: str | None = None  # in the answer of a download with update: true


@attrs.frozen
class ScoreOut:
    manual: int
    automatic: int
    priority: int
    reference: int
    reuse: int
    searched: int
    update: int


@attrs.frozen
class ProgressOut:
    status: str
    percentage: float
    model: str
    bytes: int
    total: int | None = None
    bytes_per_second: float | None = None
    eta_seconds: float | None = None
    error: str | None = None
    retrying: str | None = None
    queue_position: int | None = None
    connections: int | None = None


# --- incoming shapes --------------------------------------------------------------------


@attrs.frozen
class ByteDescriptorIn:
    value: int | None = None
    readable: str | None = None
    schema: Any = None


@attrs.frozen
class TimestampIn:
    value: str | None = None
    readable: str | None = None
    schema: Any = None


@attrs.frozen
class MaxTokensIn:
    total: int | float | None = None
    input: int | float | None = None
    output: int | float | None = None
    schema: Any = None


@attrs.frozen
class ModelBody:
    """Every key of the Pieces Model schema plus modeld's extras; read-only ones are ignored."""

    id: str | None = None
    name: str | None = None
    version: str | None = None
    cloud: bool | None = None
    created: TimestampIn | None = None
    type: str | None = None
    usage: str | None = None
    foundation: str | None = None
    description: str | None = None
    quantization: str | None = None
    cpu: bool | None = None
    custom: bool | None = None
    denied: bool | None = None
    downloaded: bool | None = None
    downloading: bool | None = None
    loaded: bool | None = None
    bytes: ByteDescriptorIn | None = None
    ram: ByteDescriptorIn | None = None
    max_tokens: MaxTokensIn | None = None
    parameters: int | float | None = None
    capabilities: Any = None
    organization: Any = None
    provider: Any = None
    schema: Any = None
    score: Any = None
    unique: Any = None
    # modeld's extras
    url: str | None = None
    sha256: str | None = None
    model_type: str | None = None
    state: Any = None
    error: Any = None
    partial_bytes: Any = None
    load_seconds: Any = None
    runtime: str | None = None
    parallel: int | None = None
    architecture: Any = None
    source: str | None = None  # on create only: a Hub reference (supervisor/hub_refs.py)
    revision: Any = None
    file: Any = None
    parts: Any = None
    keep_alive: str | None = None
    expires_at: Any = None
    memory_estimate: Any = None


def _strict(tp: type) -> Any:
    def structure(value: Any, _type: Any) -> Any:
        if isinstance(value, bool) and tp is not bool:
            raise TypeError(f"expected {tp.__name__}, got a boolean")
        if tp is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, tp):
            raise TypeError(f"expected {tp.__name__}, got {type(value).__name__}")
        return value

    return structure


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    for tp in (str, int, float, bool):
        conv.register_structure_hook(tp, _strict(tp))

    def union_number(value: Any, _type: Any) -> int | float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {type(value).__name__}")
        return value

    def optional_number(value: Any, _type: Any) -> int | float | None:
        return None if value is None else union_number(value, _type)

    conv.register_structure_hook(int | float, union_number)
    conv.register_structure_hook(int | float | None, optional_number)
    conv.register_structure_hook(Any, lambda value, _type: value)

    def renames(cls: type) -> dict[str, Any]:
        return {a.name: override(rename=camel(a.name)) for a in attrs.fields(cls)}

    conv.register_unstructure_hook_factory(
        attrs.has,
        lambda cls: make_dict_unstructure_fn(
            cls, conv, _cattrs_omit_if_default=True, **renames(cls)
        ),
    )
    conv.register_structure_hook_factory(
        attrs.has,
        lambda cls: make_dict_structure_fn(
            cls, conv, _cattrs_forbid_extra_keys=True, **renames(cls)
        ),
    )
    return conv


_converter = _make_converter()


def _descriptor(n: int | None) -> ByteDescriptor | None:
    return None if n is None else ByteDescriptor(value=n, readable=format_bytes(n))


def iso_utc(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def model_json(view: ModelView, *, evicted: list[str] | None = None,
               update_available: bool | None = None,
               update: str | None = None) -> dict[str, Any]:
    spec, facts = view.spec, view.facts
    f = flags(view.state)
    context = (view.context_length or (facts.context_length if facts else None)
               or spec.context_length)
    size = facts.size if facts and f.downloaded else spec.size
    params = facts.parameter_count if facts else None
    out = ModelOut(
        id=spec.id,
        name=spec.name,
        version=spec.version,
        cloud=False,
        created=Timestamp(iso_utc(spec.created)),
        type=spec.type,
        usage=spec.usage,
        downloaded=f.downloaded,
        downloading=f.downloading,
        loaded=f.loaded,
        custom=spec.custom,
        cpu=True,
        state=view.state.value,
        partial_bytes=view.partial_bytes,
        model_type=spec.model_type,
        bytes=_descriptor(size),
        ram=_descriptor(spec.ram),
        foundation=spec.foundation,
        quantization=spec.quantization or (facts.quantization if facts else None),
        description=spec.description,
        max_tokens=None if context is None else MaxTokens(total=context, input=context,
                                                          output=context),
        parameters=None if not params else round(params / 1e9, 4),
        url=spec.url,
        sha256=spec.sha256,
        error=view.error,
        load_seconds=view.load_seconds,
        unique=spec.id,
        score=ScoreOut(**attrs.asdict(spec.score)),
        evicted=evicted or None,
        pid=view.worker_pid,
        resident_bytes=resident_bytes(view.worker_pid),
        runtime=view.runtime,
        architecture=facts.architecture if facts else None,
        parallel=spec.parallel,
        source=spec.source,
        revision=spec.revision,
        file=spec.file,
        parts=[p.file for p in spec.parts] or None,
        keep_alive=spec.keep_alive,
        expires_at=None if view.expires_at is None
        else iso_utc(dt.datetime.fromtimestamp(view.expires_at, dt.UTC)),
        memory_estimate=view.memory_estimate,
        update_available=update_available,
        update=update,
    )
    result: dict[str, Any] = _converter.unstructure(out)
    # These are always sent, even when they equal their defaults.
    for key in ("downloaded", "downloading", "loaded", "custom", "cpu", "cloud", "partialBytes"):
        result[key] = _converter.unstructure(getattr(out, _snake(key)))
    return result


def _snake(name: str) -> str:
    return re.sub(r"[A-Z]", lambda m: "_" + m.group(0).lower(), name)


def progress_json(progress: Progress) -> dict[str, Any]:
    out = ProgressOut(
        status=progress.status,
        percentage=progress.percentage,
        model=progress.model,
        bytes=progress.bytes,
        total=progress.total,
        bytes_per_second=progress.bytes_per_second,
        eta_seconds=progress.eta_seconds,
        error=progress.error,
        retrying=progress.retrying,
        queue_position=progress.queue_position,
        connections=progress.connections,
    )
    result: dict[str, Any] = _converter.unstructure(out)
    result["percentage"] = progress.percentage
    result["bytes"] = progress.bytes
    return result


def parse_model_body(data: Any) -> ModelBody:
    """Structure a decoded JSON body; BodyError carries every problem with its path."""
    if not isinstance(data, dict):
        raise BodyError("the body must be a JSON object (a Model)")
    try:
        return _converter.structure(data, ModelBody)
    except cattrs.BaseValidationError as exc:
        raise BodyError("; ".join(cattrs.transform_error(exc, path="$"))) from None


def _check_fields(body: ModelBody, *, allow_http: bool) -> None:
    problems = []
    if body.name is not None and not body.name.strip():
        problems.append("$.name: must not be empty")
    if body.name is not None and len(body.name) > 256:
        problems.append("$.name: at most 256 characters")
    if body.cloud:
        problems.append("$.cloud: modeld runs models locally; cloud must be false")
    if body.type is not None and body.type not in MODEL_TYPES:
        problems.append(f"$.type: expected one of {sorted(MODEL_TYPES)}")
    if body.usage is not None and body.usage not in USAGES:
        problems.append("$.usage: not a known Pieces model usage")
    if body.foundation is not None and body.foundation not in FOUNDATIONS:
        problems.append("$.foundation: not a known Pieces model foundation")
    if body.url is not None:
        why = check_url(body.url, allow_http=allow_http)
        if why:
            problems.append(f"$.url: {why}")
    if body.sha256 is not None and not SHA256_PATTERN.fullmatch(body.sha256):
        problems.append("$.sha256: expected 64 lower-case hex digits")
    if body.model_type is not None and body.model_type not in RUNTIME_TYPES:
        problems.append(f"$.modelType: expected one of {sorted(RUNTIME_TYPES)}")
    if body.runtime is not None and body.runtime not in RUNTIME_CHOICES:
        problems.append(f"$.runtime: expected one of {list(RUNTIME_CHOICES)}")
    if body.parallel is not None and not 1 <= body.parallel <= 64:
        problems.append("$.parallel: must be between 1 and 64")
    if body.keep_alive is not None:
        try:
            parse_keep_alive(body.keep_alive)
        except ValueError as exc:
            problems.append(f"$.keepAlive: {exc}")
    for name in ("bytes", "ram"):
        descriptor = getattr(body, name)
        if descriptor is not None and descriptor.value is not None and not (
            0 <= descriptor.value <= MAX_BYTES
        ):
            problems.append(f"$.{name}.value: must be between 0 and {MAX_BYTES}")
    for name in ("version", "description", "quantization"):
        value = getattr(body, name)
        if value is not None and len(value) > 4096:
            problems.append(f"$.{name}: at most 4096 characters")
    if problems:
        raise BodyError("; ".join(problems))


def slug_id(name: str, seed: str) -> str:
    """A readable, valid id for a new custom model."""
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] or "model"
    suffix = hashlib.sha256(seed.encode()).hexdigest()[:8]
    return f"{base}-{suffix}"


def spec_from_create(body: ModelBody, model_id: str, *, allow_http: bool) -> ModelSpec:
    """A new custom ModelSpec from a SeededModel body."""
    if body.name is None:
        raise BodyError("$.name: required")
    _check_fields(body, allow_http=allow_http)
    return ModelSpec(
        id=model_id,
        name=body.name,
        url=body.url,
        sha256=body.sha256,
        size=body.bytes.value if body.bytes and body.bytes.value else None,
        model_type=body.model_type or "llama",
        version=body.version or "1",
        description=body.description,
        quantization=body.quantization,
        foundation=body.foundation,
        type=body.type or "BALANCED",
        usage=body.usage or "CODE_CONVERSATION",
        ram=body.ram.value if body.ram and body.ram.value else None,
        runtime=body.runtime,
        parallel=body.parallel,
        keep_alive=body.keep_alive,
        custom=True,
    )


def spec_from_update(body: ModelBody, current: ModelSpec, *, allow_http: bool) -> ModelSpec:
    """`current` with the metadata `body` changes; read-only keys are ignored."""
    _check_fields(body, allow_http=allow_http)
    changes: dict[str, Any] = {}
    for name in ("name", "version", "description", "quantization", "foundation", "type",
                 "usage", "url", "sha256", "model_type", "runtime", "parallel", "keep_alive"):
        value = getattr(body, name)
        if value is not None:
            changes[name] = value
    if body.ram is not None and body.ram.value:
        changes["ram"] = body.ram.value
    return attrs.evolve(current, **changes)


def score_counters(body: Any) -> tuple[str, ...]:
    """The counters a SeededScoreIncrement raises for a model (its `model` part; the parts
    for other Pieces objects are not modeld's and are ignored)."""
    if not isinstance(body, dict):
        raise BodyError("$: expected an object (a SeededScoreIncrement)")
    part = body.get("model")
    if part is None:
        return ()
    if not isinstance(part, dict):
        raise BodyError("$.model: expected an object (a SeededScore)")
    counters = []
    for key, value in part.items():
        if key == "schema":
            continue
        if key not in SCORE_COUNTERS:
            raise BodyError(f"$.model.{key}: not a counter; expected one of "
                            f"{', '.join(SCORE_COUNTERS)}")
        if not isinstance(value, bool):
            raise BodyError(f"$.model.{key}: expected a boolean")
        if value:
            counters.append(key)
    return tuple(counters)


def parse_delete_cache(body: Any) -> None:
    """A ModelDeleteCacheInput: an object whose only key is the SDK's `schema`."""
    if not isinstance(body, dict):
        raise BodyError("$: expected an object (a ModelDeleteCacheInput)")
    unknown = sorted(set(body) - {"schema"})
    if unknown:
        raise BodyError(f"$.{unknown[0]}: unknown key")
