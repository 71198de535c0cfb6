"""The OpenAPI document: the same as the checked-in file, the app's routes and the wire shapes,
served by the daemon; then schemathesis against a live daemon (no 5xx, no undocumented status,
no response outside its schema, and no crash)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, cast

import attrs
import httpx
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from supervisor.api.app import create_app
from supervisor.api.openapi import DOCUMENT_TEXT, build_document
from supervisor.config import Config
from supervisor.registry import Registry
from supervisor.wire import (
    ByteDescriptor,
    ByteDescriptorIn,
    MaxTokens,
    MaxTokensIn,
    ModelBody,
    ModelOut,
    ProgressOut,
    Timestamp,
    TimestampIn,
    camel,
)
from tests.daemon import ROOT, Daemon
from tests.gguf_factory import write_tiny_llama

CHECKED_IN = ROOT / "supervisor" / "api" / "openapi.json"
AUTOMATIC = {"HEAD", "OPTIONS"}  # added by Quart to every rule; not part of the API


def app_routes() -> set[tuple[str, str]]:
    app = create_app(cast(Registry, object()), Config())
    routes = set()
    for rule in app.url_map.iter_rules():
        path = rule.rule.replace("<", "{").replace(">", "}")
        if rule.websocket:
            routes.add((path, "get"))  # documented on the GET of the same path
        for method in (rule.methods or set()) - AUTOMATIC:
            routes.add((path, method.lower()))
    return routes


def document_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method) for path, item in doc["paths"].items() for method in item}


def test_checked_in_document_is_the_built_one() -> None:
    assert build_document() == json.loads(CHECKED_IN.read_text()), (
        "regenerate: python -m supervisor.api.openapi > supervisor/api/openapi.json")
    assert DOCUMENT_TEXT == CHECKED_IN.read_text()


def test_document_paths_and_methods_are_the_apps_routes() -> None:
    assert app_routes() == document_routes(build_document())


def names(cls: type) -> set[str]:
    return {camel(a.name) for a in attrs.fields(cls)}


def test_schemas_match_the_wire_shapes() -> None:
    schemas = build_document()["components"]["schemas"]

    def props(name: str) -> set[str]:
        return set(schemas[name]["properties"])

    assert names(ModelOut) == props("Model")
    assert names(ProgressOut) == props("ModelDownloadProgress")
    assert names(ByteDescriptor) == props("ByteDescriptor")
    assert names(Timestamp) == props("GroupedTimestamp")
    assert names(MaxTokens) == props("ModelMaxTokens")
    assert names(ModelBody) == props("ModelUpdate")
    assert names(ModelBody) - {"id"} == props("SeededModel")
    assert names(ByteDescriptorIn) == props("ByteDescriptorInput")
    assert names(TimestampIn) == props("GroupedTimestampInput")
    assert names(MaxTokensIn) == props("ModelMaxTokensInput")
    # Every required field is one the daemon always sends (no default on the attrs class).
    always = {camel(a.name) for a in attrs.fields(ModelOut) if a.default is attrs.NOTHING}
    assert always == set(schemas["Model"]["required"])


def test_every_status_has_the_error_schema() -> None:
    doc = build_document()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    assert response["$ref"].startswith("#/components/responses/E"), (
                        path, method, status)


# --- against a live daemon ---------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("openapi")
    # The catalog models' origins refuse connections: a download started by the fuzzer fails
    # in the background, it never reaches the network.
    catalog: list[dict[str, Any]] = [
        {"id": "cat-a", "name": "Catalog A", "url": "http://127.0.0.1:9/a.gguf", "size": 1000,
         "type": "SPEED", "quantization": "Q4_K_M", "foundation": "LLAMA_2_7B"},
        {"id": "cat-b", "name": "Catalog B", "url": "http://127.0.0.1:9/b.gguf"},
    ]
    made = Daemon(tmp / "daemon", catalog, download={"retries": 0, "stall_timeout": 2.0},
                  runtime={"load_timeout": 20.0}, hub={"endpoint": "http://127.0.0.1:9"})
    made.start()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def real_ids(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A catalog model, a custom model without a file and one with an imported file."""
    base = daemon.url
    bare = httpx.post(f"{base}/models/create", json={"name": "fuzz custom"}).json()["id"]
    with_file = httpx.post(f"{base}/models/create", json={"name": "fuzz imported"}).json()["id"]
    gguf = write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf", context_length=64)
    r = httpx.put(f"{base}/model/{with_file}/file", content=gguf.read_bytes(),
                  headers={"content-type": "application/octet-stream"})
    assert 200 == r.status_code, r.text
    return ["cat-a", bare, with_file]


def test_served_document_is_the_built_one(daemon: Daemon) -> None:
    r = httpx.get(f"{daemon.url}/openapi.json")
    assert 200 == r.status_code
    assert "application/json" == r.headers["content-type"]
    assert build_document() == r.json()


# Stand-ins for the custom models' ids (random, known only once the daemon runs): some
# generated ids name real models, so requests reach actors, not only the 410 path.
STAND_INS = ["cat-a", "custom-stand-in", "imported-stand-in"]


@pytest.fixture(scope="module")
def fuzz_schema() -> Any:
    """Built when the test runs, not at collection (where every pytest worker would build the
    coverage cases of every operation)."""
    doc = build_document()
    param = doc["components"]["parameters"]["model"]
    param["schema"] = {"anyOf": [{"enum": STAND_INS}, param["schema"]]}
    config = schemathesis.Config.from_dict({
        "generation": {"max-examples": 10, "database": "none", "no-shrink": True},
        "request-timeout": 30,
    })
    return schemathesis.openapi.from_dict(doc, config=config)


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@schema.parametrize()  # type: ignore[untyped-decorator]
def test_api_conforms_to_its_document(case: schemathesis.Case[Any], daemon: Daemon,
                                      real_ids: list[str]) -> None:
    model = (case.path_parameters or {}).get("model")
    if model is not None and ("#" in str(model) or "?" in str(model)):
        # The test client puts these into the URL unencoded: the request would name another
        # path (a fragment or a query cuts it short), not this operation.
        return
    if model in STAND_INS:
        assert case.path_parameters is not None
        case.path_parameters["model"] = real_ids[STAND_INS.index(model)]
    case.call_and_validate(base_url=daemon.url, checks=[
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ])


def test_daemon_survived_the_fuzzing(daemon: Daemon, real_ids: list[str]) -> None:
    r = httpx.get(f"{daemon.url}/models")
    assert 200 == r.status_code
    assert "cat-a" in [m["id"] for m in r.json()["iterable"]]
    assert [] == daemon.events("request_crashed")
    assert [] == [line for line in daemon.lines if line.get("level") in ("error", "critical")
                  and line.get("event") not in ("download_failed", "request_failed")]
    assert 0 == daemon.stop()
    del real_ids
