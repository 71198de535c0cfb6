"""The converter: every field of the Model object through the real SDK's pydantic models."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from pieces_os_client.api_client import ApiClient
from pieces_os_client.models.model import Model
from pieces_os_client.models.model_download_progress import ModelDownloadProgress
from pieces_os_client.models.seeded_model import SeededModel

from actors.messages import FileFacts, ModelView, Progress
from actors.spec import ModelSpec
from actors.state import State
from supervisor.units import format_bytes
from supervisor.wire import (
    BodyError,
    model_json,
    parse_model_body,
    progress_json,
    spec_from_create,
    spec_from_update,
)

SPEC = ModelSpec(
    id="tiny-1",
    name="Tiny",
    url="https://example.invalid/tiny.gguf",
    sha256="a" * 64,
    size=1234,
    version="2",
    description="a tiny model",
    quantization="F32",
    foundation="LLAMA_2_7B",
    type="SPEED",
    usage="CODE_CONVERSATION",
    ram=5_000_000,
    custom=True,
    created=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
)


@pytest.mark.parametrize("state", list(State))
def test_model_round_trips_through_the_sdk(state: State) -> None:
    view = ModelView(
        spec=SPEC,
        state=state,
        error="boom" if state is State.DOWNLOADED else None,
        partial_bytes=10,
        load_seconds=0.25 if state is State.LOADED else None,
        facts=FileFacts(size=4321, context_length=128, parameter_count=1_500_000),
    )
    data = model_json(view)
    model = Model.from_json(json.dumps(data))
    assert model is not None
    assert "tiny-1" == model.id
    assert "Tiny" == model.name
    assert "2" == model.version
    assert model.cloud is False
    assert dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC) == model.created.value
    assert data["created"]["value"].endswith("Z")
    assert "SPEED" == model.type.value
    assert "CODE_CONVERSATION" == model.usage.value
    assert "LLAMA_2_7B" == model.foundation.value
    assert "F32" == model.quantization
    assert "a tiny model" == model.description
    assert model.custom is True
    assert model.cpu is True
    assert 5_000_000 == model.ram.value
    assert "5.0 MB" == model.ram.readable
    assert 128 == model.max_tokens.total
    assert 0.0015 == model.parameters
    expected = {
        State.ABSENT: (False, False, False),
        State.DOWNLOADING: (False, True, False),
        State.DOWNLOADED: (True, False, False),
        State.LOADING: (True, False, False),
        State.LOADED: (True, False, True),
        State.UNLOADING: (True, False, True),
    }[state]
    assert expected == (model.downloaded, model.downloading, model.loaded)
    # bytes: the file's real size once downloaded, else the catalog's
    assert (4321 if expected[0] else 1234) == model.bytes.value
    # modeld's extras
    assert state.value == data["state"]
    assert "https://example.invalid/tiny.gguf" == data["url"]
    assert "a" * 64 == data["sha256"]
    assert "llama" == data["modelType"]
    assert 10 == data["partialBytes"]
    assert ("boom" if state is State.DOWNLOADED else None) == data.get("error")


def test_minimal_model_has_every_required_key() -> None:
    view = ModelView(spec=ModelSpec(id="x", name="X"), state=State.ABSENT)
    data = model_json(view)
    for key in ("id", "name", "version", "cloud", "created", "type", "usage", "downloaded",
                "downloading", "loaded", "custom", "cpu"):
        assert key in data
    assert "1" == data["version"]
    assert Model.from_json(json.dumps(data)) is not None


@pytest.mark.parametrize(
    "status", ["INITIALIZED", "IN-PROGRESS", "COMPLETED", "FAILED", "CANCELED", "RESET", "UNKNOWN"]
)
def test_progress_round_trips(status: str) -> None:
    data = progress_json(Progress(model="m", status=status, percentage=42.5, bytes=5, total=10,
                                  bytes_per_second=2.0, eta_seconds=2.5))
    parsed = ModelDownloadProgress.from_json(json.dumps(data))
    assert parsed is not None
    assert status == parsed.status.value
    assert 42.5 == parsed.percentage
    assert {"model": "m", "bytes": 5, "total": 10, "bytesPerSecond": 2.0,
            "etaSeconds": 2.5}.items() <= data.items()


def test_sdk_update_body_is_accepted() -> None:
    """What the SDK sends on update: a whole Model, read-only keys and nulls included."""
    view = ModelView(spec=SPEC, state=State.DOWNLOADED, facts=FileFacts(size=5))
    model = Model.from_json(json.dumps(model_json(view)))
    assert model is not None
    model.name = "Renamed"
    body = ApiClient().sanitize_for_serialization(model)
    parsed = parse_model_body(body)
    new = spec_from_update(parsed, SPEC, allow_http=False)
    assert "Renamed" == new.name
    assert SPEC.created == new.created
    assert SPEC.size == new.size


def test_sdk_seeded_model_creates_a_custom_spec() -> None:
    seeded = SeededModel.from_dict({
        "name": "Mine", "version": "3", "cloud": False,
        "created": {"value": "2026-01-01T00:00:00Z"}, "type": "BALANCED",
        "usage": "CODE_CONVERSATION",
    })
    body = ApiClient().sanitize_for_serialization(seeded)
    body["url"] = "https://example.invalid/m.gguf"
    spec = spec_from_create(parse_model_body(body), "mine-1", allow_http=False)
    assert spec.custom
    assert ("Mine", "3", "https://example.invalid/m.gguf") == (spec.name, spec.version, spec.url)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"name": 5}, "$.name"),
        ({"name": "x", "cloud": "no"}, "$.cloud"),
        ({"name": "x", "bytes": {"value": "1"}}, "$.bytes.value"),
        ({"name": "x", "bytes": {"value": True}}, "$.bytes.value"),
        ({"name": "x", "surprise": 1}, "surprise"),
        ({"name": "x", "maxTokens": {"total": 1, "extra": 2}}, "extra"),
    ],
)
def test_bad_bodies_name_the_field(body: dict[str, object], needle: str) -> None:
    with pytest.raises(BodyError) as info:
        parse_model_body(body)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "$.name"),
        ({"name": "x", "type": "FAST"}, "$.type"),
        ({"name": "x", "usage": "NOPE"}, "$.usage"),
        ({"name": "x", "url": "ftp://h/x"}, "$.url"),
        ({"name": "x", "url": "http://h/x"}, "allow_http"),
        ({"name": "x", "url": "https://u:p@h/x"}, "credentials"),
        ({"name": "x", "sha256": "XYZ"}, "$.sha256"),
        ({"name": "x", "modelType": "cobol"}, "$.modelType"),
        ({"name": "x", "cloud": True}, "$.cloud"),
        ({"name": "  "}, "$.name"),
    ],
)
def test_bad_values_are_refused(body: dict[str, object], needle: str) -> None:
    with pytest.raises(BodyError) as info:
        spec_from_create(parse_model_body(body), "x", allow_http=False)
    assert needle in str(info.value)


@pytest.mark.parametrize("body", [[], "x", 1, None])
def test_body_must_be_an_object(body: object) -> None:
    with pytest.raises(BodyError):
        parse_model_body(body)


def test_readable_bytes() -> None:
    assert "999 B" == format_bytes(999)
    assert "1.2 GB" == format_bytes(1_200_000_000)
    assert "668.8 MB" == format_bytes(668_788_096)
    assert "-" == format_bytes(None)
