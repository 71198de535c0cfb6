"""The metadata side of the Model API, through a real daemon and the official SDK."""

from __future__ import annotations

import datetime as dt
import hashlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pieces_os_client.exceptions import ApiException
from pieces_os_client.models.seeded_model import SeededModel

from tests.daemon import ROOT, Daemon
from tests.e2e.conftest import DaemonFactory, Sdk
from tests.gguf_factory import write_tiny_llama

CATALOG = [
    {"id": "cat-a", "name": "Catalog A", "url": "https://models.invalid/a.gguf",
     "size": 1000, "type": "SPEED", "quantization": "Q4_K_M"},
    {"id": "cat-b", "name": "Catalog B", "url": "https://models.invalid/b.gguf", "version": "7"},
]


def seeded(name: str, url: str | None = "https://models.invalid/custom.gguf") -> SeededModel:
    data = {
        "name": name, "version": "1", "cloud": False,
        "created": {"value": dt.datetime.now(dt.UTC).isoformat()},
        "type": "BALANCED", "usage": "CODE_CONVERSATION",
    }
    model = SeededModel.from_dict(data)
    assert model is not None
    return model


def create_custom(base: str, name: str, url: str | None = None) -> str:
    body: dict[str, object] = {"name": name}
    if url:
        body["url"] = url
    r = httpx.post(f"{base}/models/create", json=body)
    assert 200 == r.status_code, r.text
    return str(r.json()["id"])


def test_catalog_listed_and_snapshots(make_daemon: DaemonFactory,
                                      sdk_for: Callable[[Daemon], Sdk]) -> None:
    daemon = make_daemon(CATALOG).start()
    sdk = sdk_for(daemon)
    listed = sdk.models.models_snapshot()
    assert ["cat-a", "cat-b"] == [m.id for m in listed.iterable]
    a = sdk.model.models_specific_model_snapshot("cat-a")
    assert ("Catalog A", "1", False, False, False) == (
        a.name, a.version, a.downloaded, a.downloading, a.loaded)
    assert 1000 == a.bytes.value
    assert "SPEED" == a.type.value
    assert "7" == sdk.model.models_specific_model_snapshot("cat-b").version
    with pytest.raises(ApiException) as info:
        sdk.model.models_specific_model_snapshot("no-such-model")
    assert 410 == info.value.status
    assert 0 == daemon.stop()


def test_custom_model_create_update_delete_and_restart(
    make_daemon: DaemonFactory, sdk_for: Callable[[Daemon], Sdk]
) -> None:
    daemon = make_daemon(CATALOG).start()
    sdk = sdk_for(daemon)
    created = sdk.models.models_create_new_model(seeded_model=seeded("My Model"))
    assert created.custom is True
    assert created.id.startswith("my-model-")
    assert (False, False, False) == (created.downloaded, created.downloading, created.loaded)
    record = daemon.storage / "custom" / f"{created.id}.json"
    assert record.is_file()

    created.name = "My Renamed Model"
    created.description = "renamed through the SDK"
    updated = sdk.model.model_update(model=created)
    assert ("My Renamed Model", "renamed through the SDK") == (updated.name, updated.description)

    # Catalog models are not the user's to edit.
    catalog = sdk.model.models_specific_model_snapshot("cat-a")
    catalog.name = "hijacked"
    with pytest.raises(ApiException) as info:
        sdk.model.model_update(model=catalog)
    assert 409 == info.value.status
    assert "Catalog A" == sdk.model.models_specific_model_snapshot("cat-a").name

    assert 0 == daemon.stop()
    daemon.start()
    sdk = sdk_for(daemon)
    again = sdk.model.models_specific_model_snapshot(created.id)
    assert ("My Renamed Model", "renamed through the SDK", True) == (
        again.name, again.description, again.custom)
    assert created.id in [m.id for m in sdk.models.models_snapshot().iterable]

    sdk.models.models_delete_specific_model(created.id)
    assert not record.exists()
    with pytest.raises(ApiException) as info:
        sdk.model.models_specific_model_snapshot(created.id)
    assert 410 == info.value.status
    with pytest.raises(ApiException) as info:
        sdk.models.models_delete_specific_model(created.id)
    assert 410 == info.value.status
    assert 0 == daemon.stop()
    daemon.start()
    assert created.id not in [m.id for m in sdk_for(daemon).models.models_snapshot().iterable]
    assert 0 == daemon.stop()


def test_import_a_gguf_file(make_daemon: DaemonFactory, sdk_for: Callable[[Daemon], Sdk],
                            tmp_path: Path) -> None:
    daemon = make_daemon().start()
    model_id = create_custom(daemon.url, "Tiny Import")
    gguf = write_tiny_llama(tmp_path / "tiny.gguf", context_length=256)
    r = httpx.put(f"{daemon.url}/model/{model_id}/file", content=gguf.read_bytes(),
                  headers={"content-type": "application/octet-stream"})
    assert 200 == r.status_code, r.text
    body = r.json()
    assert (True, False, False) == (body["downloaded"], body["downloading"], body["loaded"])
    assert gguf.stat().st_size == body["bytes"]["value"]
    assert 256 == body["maxTokens"]["total"]
    published = daemon.storage / "models" / f"{model_id}.gguf"
    assert gguf.read_bytes() == published.read_bytes()
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert digest == body["sha256"]  # recorded: clients find a file imported before by it

    # Another file replaces it (and its sha256)...
    other = write_tiny_llama(tmp_path / "other.gguf", context_length=128)
    r = httpx.put(f"{daemon.url}/model/{model_id}/file", content=other.read_bytes(),
                  headers={"content-type": "application/octet-stream"})
    assert (200, hashlib.sha256(other.read_bytes()).hexdigest()) == (r.status_code,
                                                                     r.json()["sha256"])
    r = httpx.put(f"{daemon.url}/model/{model_id}/file", content=gguf.read_bytes(),
                  headers={"content-type": "application/octet-stream"})
    assert (200, digest) == (r.status_code, r.json()["sha256"])
    # ...but not for a model whose url serves a file of a known sha256.
    pinned = httpx.post(f"{daemon.url}/models/create", json={
        "name": "Pinned", "url": "https://127.0.0.1:9/pinned.gguf", "sha256": "0" * 64}).json()
    r = httpx.put(f"{daemon.url}/model/{pinned['id']}/file", content=gguf.read_bytes(),
                  headers={"content-type": "application/octet-stream"})
    assert (400, "checksum_mismatch") == (r.status_code, r.json()["error"])
    assert digest in r.json()["message"]
    assert not (daemon.storage / "models" / f"{pinned['id']}.gguf").exists()

    # A file that is not GGUF is refused and changes nothing.
    r = httpx.put(f"{daemon.url}/model/{model_id}/file", content=b"not a model" * 100,
                  headers={"content-type": "application/octet-stream"})
    assert 400 == r.status_code
    assert "model_file_invalid" == r.json()["error"]
    assert gguf.read_bytes() == published.read_bytes()
    assert [] == [p for p in published.parent.iterdir() if p.name.startswith(".")]

    assert 0 == daemon.stop()
    daemon.start()
    snap = sdk_for(daemon).model.models_specific_model_snapshot(model_id)
    assert snap.downloaded is True
    sdk_for(daemon).models.models_delete_specific_model(model_id)
    assert not published.exists()
    assert 0 == daemon.stop()


def test_bad_input_gets_clear_json_errors(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(CATALOG).start()
    base = daemon.url
    model_id = create_custom(base, "victim")
    cases: list[tuple[str, str, dict[str, object], int, str]] = [
        ("GET", "/model/bad%20id", {}, 400, "invalid_id"),
        ("GET", "/model/.hidden", {}, 400, "invalid_id"),
        ("GET", "/model/" + "a" * 200, {}, 400, "invalid_id"),
        ("GET", "/model/unknown-model", {}, 410, "model_not_found"),
        ("POST", "/model/unknown-model/download", {}, 410, "model_not_found"),
        ("POST", "/models/create", {"content": b"{not json", "headers": {
            "content-type": "application/json"}}, 400, "invalid_body"),
        ("POST", "/models/create", {"content": b"\xff\xfe", "headers": {
            "content-type": "application/json"}}, 400, "invalid_body"),
        ("POST", "/models/create", {"content": b"[" * 10000 + b"]" * 10000, "headers": {
            "content-type": "application/json"}}, 400, "invalid_body"),
        ("POST", "/models/create", {"json": [1, 2]}, 400, "invalid_body"),
        ("POST", "/models/create", {"json": {"name": 3}}, 400, "invalid_body"),
        ("POST", "/models/create", {"json": {"name": "x", "nope": 1}}, 400, "invalid_body"),
        ("POST", "/models/create", {"content": b'{"name":"x"}', "headers": {
            "content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ("POST", "/models/create", {"content": b'{"name":"' + b"x" * (1024 * 1024 + 10) + b'"}',
                                    "headers": {"content-type": "application/json"}},
         413, "payload_too_large"),
        ("POST", "/model/update", {"json": {"id": "cat-a", "name": "x"}}, 409, "not_custom"),
        ("POST", "/model/update", {"json": {"id": "missing", "name": "x"}}, 410,
         "model_not_found"),
        ("POST", "/model/update", {"json": {"name": "no id"}}, 400, "invalid_body"),
        ("POST", "/model/update", {"json": {"id": model_id, "url": "file:///etc/passwd"}}, 400,
         "invalid_body"),
        ("POST", "/model/cat-a/load", {}, 409, "not_loadable"),
        ("GET", "/nowhere", {}, 404, "not_found"),
        ("DELETE", "/model/cat-a", {}, 405, "method_not_allowed"),
    ]
    for method, path, kwargs, status, code in cases:
        r = httpx.request(method, base + path, **kwargs)  # type: ignore[arg-type]
        assert (status, code) == (r.status_code, r.json().get("error")), (method, path, r.text)
        assert "application/json" == r.headers["content-type"]
        assert r.json()["message"]
        assert "Traceback" not in r.text
    # Nothing changed.
    r = httpx.get(f"{base}/model/{model_id}")
    assert ("victim", None) == (r.json()["name"], r.json().get("url"))
    assert 2 + 1 == len(httpx.get(f"{base}/models").json()["iterable"])
    assert [] == daemon.events("request_crashed")
    assert 0 == daemon.stop()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[server]\nprot = 1\n", "server"),
        ("[server]\nport = \"x\"\n", "config.server.port"),
        ("[download]\nretries = true\n", "config.download.retries"),
        ("[[models]]\nid = \"a\"\nname = \"A\"\nurl = \"ftp://x/y\"\n", "models[0].url"),
        ("[[models]]\nid = \"a\"\nname = \"A\"\nurl = \"http://x/y\"\n", "allow_http"),
        ("[[models]]\nid = \"../a\"\nname = \"A\"\nurl = \"https://x/y\"\n", "models[0].id"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor", "serve", "--config", str(path)],
        cwd=ROOT, capture_output=True, timeout=30, text=True,
    )
    assert 2 == proc.returncode
    assert needle in proc.stderr


def test_example_config_parses() -> None:
    from supervisor.config import load_config

    config = load_config(ROOT / "config.example.toml")
    assert "127.0.0.1" == config.server.host
    assert 1000 == config.server.port
    assert len(config.models) >= 3
    # Every entry comes from Hugging Face and every download is verified: by the entry's own
    # sha256 (with a url), or by the Hub's LFS sha256 of the pinned commit (with a source).
    for m in config.models:
        if m.source is None:
            assert m.url is not None and m.url.startswith("https://huggingface.co/"), m.id
            assert m.sha256 is not None, m.id
        else:
            assert m.source.startswith("hf.co/") and m.url is None and m.sha256 is None, m.id
    assert 2 <= len([m for m in config.models if m.source is not None])
    # The built-in defaults are that catalog.
    assert config == load_config(None)
