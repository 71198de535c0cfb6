"""Configuration: TOML -> attrs, strictly. Unknown keys and wrong types name their key path."""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import cattrs
import cattrs.v
from cattrs.gen import make_dict_structure_fn

from actors.disk import DISK_MARGIN
from actors.durations import FOREVER, parse_keep_alive
from actors.runtimes import CHOICES as RUNTIME_CHOICES
from actors.spec import MODEL_TYPES, RUNTIME_TYPES, SHA256_PATTERN, check_url, is_valid_id
from supervisor.enums import FOUNDATIONS, USAGES

DEFAULT_PATHS = (Path("/etc/modeld/config.toml"),)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key path."""


def _rule(holds: Callable[[Any], bool], rule: str) -> Callable[..., None]:
    """An attrs validator whose error names the key, the value and the rule."""

    def validate(_inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
        if not holds(value):
            raise ValueError(f"{attr.name} = {value!r}: {rule}")

    return validate


_positive = _rule(lambda v: v > 0, "must be greater than 0")
_non_negative = _rule(lambda v: v >= 0, "must not be negative")


@attrs.frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = attrs.field(
        default=1000, validator=_rule(lambda v: 0 <= v <= 65535,
                                      "must be 1-65535 (0: any free port, for tests)"))
    allowed_hosts: list[str] = attrs.field(factory=list)
    allowed_origins: list[str] = attrs.field(factory=list)
    token_file: str = ""
    read_timeout: float = attrs.field(default=30.0, validator=_positive)
    max_connections: int = attrs.field(default=512, validator=_positive)


@attrs.frozen
class StorageConfig:
    dir: str = "~/.local/share/modeld"
    max_custom_models: int = attrs.field(default=1000, validator=_positive)
    # Bytes of free space kept on the storage filesystem: a file that would leave less is
    # refused before its first byte (507), and a download of unknown size stops there.
    min_free: int = attrs.field(default=DISK_MARGIN, validator=_non_negative)

    def path(self) -> Path:
        return Path(self.dir or "~/.local/share/modeld").expanduser()


@attrs.frozen
class DownloadConfig:
    allow_http: bool = False
    connections: int = attrs.field(default=8, validator=_positive)
    retries: int = attrs.field(default=6, validator=_non_negative)
    stall_timeout: float = attrs.field(default=30.0, validator=_positive)
    # Bytes a second a connection must average over 30 s (a drip fails: origin_too_slow); 0: off.
    min_rate: float = attrs.field(default=1024.0, validator=_non_negative)
    # Downloads that run at once; the rest wait in line (actors/download_queue.py).
    max_active: int = attrs.field(default=4, validator=_positive)
    # Let a public origin's redirect lead to a private or loopback address (actors/addresses.py).
    allow_private: bool = False


def _runtime_choice(_inst: object, attr: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and value not in RUNTIME_CHOICES:
        raise ValueError(f"{attr.name} must be one of {', '.join(RUNTIME_CHOICES)}")


def _is_keep_alive(value: object) -> bool:
    try:
        parse_keep_alive(value)
    except ValueError:
        return False
    return True


_keep_alive = _rule(_is_keep_alive, 'must be a duration such as "15m", "30s", "0" (unload '
                    'when idle) or "-1" (keep until unloaded)')


def _optional_keep_alive(inst: object, attr: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None:
        _keep_alive(inst, attr, value)


def _optional_positive(_inst: object, attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attr.name} must be greater than 0")


@attrs.frozen
class RuntimeConfig:
    max_loaded: int = attrs.field(default=2, validator=_positive)
    threads: int = attrs.field(default=0, validator=_non_negative)
    load_timeout: float = attrs.field(default=300.0, validator=_positive)
    # How long a load waits for models in use to be idle when it must unload one to fit.
    load_wait: float = attrs.field(default=30.0, validator=_non_negative)
    default_runtime: str = attrs.field(default="auto", validator=_runtime_choice)
    parallel: int = attrs.field(default=2, validator=_positive)
    # How long a model loaded on first use (/v1) stays loaded when idle.
    keep_alive: str = attrs.field(default="15m", validator=_keep_alive)

    def thread_count(self) -> int:
        return self.threads or (os.cpu_count() or 1)

    def threads_per_worker(self) -> int:
        """`threads` shared out across the models that may be loaded at once: llama.cpp
        threads that outnumber the cores slow every model down, not just one."""
        return max(1, self.thread_count() // self.max_loaded)


def _is_check_interval(value: object) -> bool:
    try:
        return parse_keep_alive(value) != FOREVER
    except ValueError:
        return False


_check_interval = _rule(_is_check_interval, 'must be a duration such as "1h" or "0" (never)')


@attrs.frozen
class HubConfig:
    # Unset: HF_ENDPOINT, else https://huggingface.co (see parse_config).
    endpoint: str = "https://huggingface.co"
    # A file holding a Hub access token (gated and private repositories); unset: HF_TOKEN.
    token_file: str = ""
    # How often downloaded Hub models are checked for a newer file of their reference
    # ("updateAvailable"), in the background; "0": never.
    update_check: str = attrs.field(default="1h", validator=_check_interval)


@attrs.frozen
class CatalogEntry:
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
    runtime: str | None = attrs.field(default=None, validator=_runtime_choice)
    parallel: int | None = attrs.field(default=None, validator=_optional_positive)
    source: str | None = None  # a Hub reference instead of url, sha256 and size
    keep_alive: str | None = attrs.field(default=None, validator=_optional_keep_alive)


@attrs.frozen
class Config:
    server: ServerConfig = attrs.field(factory=ServerConfig)
    storage: StorageConfig = attrs.field(factory=StorageConfig)
    download: DownloadConfig = attrs.field(factory=DownloadConfig)
    runtime: RuntimeConfig = attrs.field(factory=RuntimeConfig)
    models: list[CatalogEntry] = attrs.field(factory=list)
    hub: HubConfig = attrs.field(factory=HubConfig)


def _strict(tp: type) -> Any:
    def structure(value: Any, _type: Any) -> Any:
        # bool is an int in Python; TOML keeps them apart and so do we.
        if isinstance(value, bool) and tp is not bool:
            raise TypeError(f"expected {tp.__name__}, got a boolean")
        if tp is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, tp):
            raise TypeError(f"expected {tp.__name__}, got {type(value).__name__}")
        return value

    return structure


def make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    for tp in (str, int, float, bool):
        conv.register_structure_hook(tp, _strict(tp))
    conv.register_structure_hook_factory(
        attrs.has, lambda cls: make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True)
    )
    return conv


_converter = make_converter()


def _check_catalog(config: Config) -> None:
    seen: set[str] = set()
    for i, entry in enumerate(config.models):
        where = f"models[{i}]"
        problems = []
        if not is_valid_id(entry.id):
            problems.append(f"{where}.id: {entry.id!r} is not a valid id")
        if entry.id in seen:
            problems.append(f"{where}.id: {entry.id!r} appears twice")
        seen.add(entry.id)
        problems += _source_problems(entry, where)
        why = entry.url and check_url(entry.url, allow_http=config.download.allow_http)
        if why:
            problems.append(f"{where}.url: {why}")
        if entry.sha256 is not None and not SHA256_PATTERN.fullmatch(entry.sha256):
            problems.append(f"{where}.sha256: expected 64 lower-case hex digits")
        if entry.size is not None and entry.size <= 0:
            problems.append(f"{where}.size: must be greater than 0")
        if entry.model_type not in RUNTIME_TYPES:
            problems.append(f"{where}.model_type: unknown runtime type {entry.model_type!r}")
        if entry.type not in MODEL_TYPES:
            problems.append(f"{where}.type: expected one of {sorted(MODEL_TYPES)}")
        if entry.usage not in USAGES:
            problems.append(f"{where}.usage: unknown usage {entry.usage!r}")
        if entry.foundation is not None and entry.foundation not in FOUNDATIONS:
            problems.append(f"{where}.foundation: unknown foundation {entry.foundation!r}")
        if problems:
            raise ConfigError("; ".join(problems))


def _source_problems(entry: CatalogEntry, where: str) -> list[str]:
    """A catalog entry has a url or a Hub source, and its source is a valid reference."""
    from supervisor.hub_refs import BadReference, parse_reference

    if entry.source is None:
        # Worded as cattrs words a missing key (url was required before sources).
        return [] if entry.url is not None else [f"config.{where}.url: required key missing"]
    if entry.url is not None or entry.sha256 is not None or entry.size is not None:
        return [f"{where}.source: comes instead of url, sha256 and size (the Hub gives them)"]
    try:
        parse_reference(entry.source)
    except BadReference as exc:
        return [f"{where}.source: {exc}"]
    return []


def _check_hub(config: Config) -> None:
    why = check_url(config.hub.endpoint, allow_http=config.download.allow_http)
    if why:
        raise ConfigError(f"config.hub.endpoint: {why}")


def _describe(exc: BaseException, _type: type | None) -> str:
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        known = [f.name for f in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        hints = []
        for key in sorted(exc.extra_fields):
            near = difflib.get_close_matches(key, known, n=1)
            hints.append(f"\0{key}" + (f": did you mean {near[0]}?" if near else ""))
        return "\1".join(hints)
    if isinstance(exc, ValueError) and " = " in str(exc):
        return f"\0{exc}"  # `key = value: rule`, from _rule
    if isinstance(exc, KeyError):
        return "required key missing"
    return cattrs.v.format_exception(exc, _type) if not isinstance(exc, TypeError) else str(exc)


def _config_errors(exc: cattrs.BaseValidationError) -> list[str]:
    """One line per problem, each naming the full key path: `config.server.port = 70000: must
    be 1-65535`, `unknown key config.download.alow_http: did you mean allow_http?`."""
    lines = []
    for line in cattrs.transform_error(exc, path="config", format_exception=_describe):
        message, _, path = line.rpartition(" @ ")
        for part in message.split("\1"):
            if part.startswith("\0") and " = " not in part.split(":", 1)[0]:
                lines.append(f"unknown key {path}.{part[1:]}")
            elif part.startswith("\0"):
                lines.append(f"{path}.{part[1:]}")
            else:
                lines.append(f"{path}: {part}")
    return lines


def parse_config(data: dict[str, Any]) -> Config:
    """Structure a TOML document into a Config; ConfigError names every bad key path."""
    hub = data.get("hub")
    if os.environ.get("HF_ENDPOINT") and (not isinstance(hub, dict) or "endpoint" not in hub):
        # As huggingface_hub does; the config's own key wins.
        data = {**data, "hub": {**(hub if isinstance(hub, dict) else {}),
                                "endpoint": os.environ["HF_ENDPOINT"]}}
    try:
        config = _converter.structure(data, Config)
    except cattrs.BaseValidationError as exc:
        raise ConfigError("; ".join(_config_errors(exc))) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    _check_catalog(config)
    _check_hub(config)
    return config


def find_config_path(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    env = os.environ.get("MODELD_CONFIG")
    if env:
        return Path(env)
    for path in DEFAULT_PATHS:
        if path.is_file():
            return path
    return None


def example_config_path() -> Path:
    return Path(__file__).resolve().parent / "config.example.toml"


def load_config(path: Path | None) -> Config:
    """Read `path` (None: the built-in catalog of config.example.toml)."""
    if path is None:
        path = example_config_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
