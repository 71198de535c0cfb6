"""Configuration: TOML -> attrs, strictly. Unknown keys and wrong types name their key path."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn

from actors.runtimes import CHOICES as RUNTIME_CHOICES
from actors.spec import MODEL_TYPES, RUNTIME_TYPES, SHA256_PATTERN, check_url, is_valid_id
from supervisor.enums import FOUNDATIONS, USAGES

DEFAULT_PATHS = (Path("/etc/modeld/config.toml"),)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key path."""


def _positive(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attr.name} must be greater than 0")


def _non_negative(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attr.name} must not be negative")


@attrs.frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=1000)
    allowed_hosts: list[str] = attrs.field(factory=list)
    allowed_origins: list[str] = attrs.field(factory=list)
    token_file: str = ""

    @port.validator
    def _check_port(self, _attr: attrs.Attribute[int], value: int) -> None:
        if not 0 <= value <= 65535:
            raise ValueError("port must be between 0 and 65535")


@attrs.frozen
class StorageConfig:
    dir: str = "~/.local/share/modeld"

    def path(self) -> Path:
        return Path(self.dir or "~/.local/share/modeld").expanduser()


@attrs.frozen
class DownloadConfig:
    allow_http: bool = False
    connections: int = attrs.field(default=8, validator=_positive)
    retries: int = attrs.field(default=6, validator=_non_negative)
    stall_timeout: float = attrs.field(default=30.0, validator=_positive)


def _runtime_choice(_inst: object, attr: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and value not in RUNTIME_CHOICES:
        raise ValueError(f"{attr.name} must be one of {', '.join(RUNTIME_CHOICES)}")


def _optional_positive(_inst: object, attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attr.name} must be greater than 0")


@attrs.frozen
class RuntimeConfig:
    max_loaded: int = attrs.field(default=2, validator=_positive)
    threads: int = attrs.field(default=0, validator=_non_negative)
    load_timeout: float = attrs.field(default=300.0, validator=_positive)
    default_runtime: str = attrs.field(default="auto", validator=_runtime_choice)
    parallel: int = attrs.field(default=2, validator=_positive)

    def thread_count(self) -> int:
        return self.threads or (os.cpu_count() or 1)

    def threads_per_worker(self) -> int:
        """`threads` shared out across the models that may be loaded at once: llama.cpp
        threads that outnumber the cores slow every model down, not just one."""
        return max(1, self.thread_count() // self.max_loaded)


@attrs.frozen
class CatalogEntry:
    id: str
    name: str
    url: str
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


@attrs.frozen
class Config:
    server: ServerConfig = attrs.field(factory=ServerConfig)
    storage: StorageConfig = attrs.field(factory=StorageConfig)
    download: DownloadConfig = attrs.field(factory=DownloadConfig)
    runtime: RuntimeConfig = attrs.field(factory=RuntimeConfig)
    models: list[CatalogEntry] = attrs.field(factory=list)


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
        why = check_url(entry.url, allow_http=config.download.allow_http)
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


def parse_config(data: dict[str, Any]) -> Config:
    """Structure a TOML document into a Config; ConfigError names every bad key path."""
    try:
        config = _converter.structure(data, Config)
    except cattrs.BaseValidationError as exc:
        raise ConfigError("; ".join(cattrs.transform_error(exc, path="config"))) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    _check_catalog(config)
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
