"""Both runtimes behind one wire, through a real daemon and real worker processes: the same tiny
llama file on llama.cpp and on ctransformers (load, generate, cancel, worker crash, unload), and
how the runtime is chosen (auto, explicit, an architecture no runtime runs)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.daemon import Daemon
from tests.e2e.conftest import create, upload
from tests.gguf_factory import write_tiny_llama

RUNTIMES = ("llama.cpp", "ctransformers")




@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("backends")
    tiny = write_tiny_llama(tmp / "tiny.gguf", seed=5)
    daemon = Daemon(tmp / "d", runtime={"threads": 1, "max_loaded": 3})
    daemon.start()
    try:
        ids = {}
        for runtime in (*RUNTIMES, "auto"):
            ids[runtime] = create(daemon, f"tiny {runtime}", runtime=runtime)
            assert 200 == upload(daemon, ids[runtime], tiny).status_code
        yield daemon, ids
        assert 0 == daemon.stop()
    finally:
        daemon.close()


def view(daemon: Daemon, model_id: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{daemon.url}/model/{model_id}").json()
    return body


def complete(daemon: Daemon, model_id: str, **extra: Any) -> httpx.Response:
    body = {"model": model_id, "prompt": "Hello", "max_tokens": 8, "seed": 1, **extra}
    return httpx.post(f"{daemon.url}/v1/completions", json=body, timeout=60)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_same_wire_on_both_runtimes(served: tuple[Daemon, dict[str, str]], runtime: str) -> None:
    daemon, ids = served
    model_id = ids[runtime]
    r = httpx.post(f"{daemon.url}/model/{model_id}/load", timeout=60)
    assert 200 == r.status_code, r.text
    body = r.json()
    assert (True, runtime, "llama") == (body["loaded"], body["runtime"], body["architecture"])
    pid = daemon.wait_for("model_loaded", model=model_id)["pid"]

    r = complete(daemon, model_id)
    assert 200 == r.status_code, r.text
    assert 0 < r.json()["usage"]["completion_tokens"] <= 8

    # Cancel: a client that leaves mid-stream frees the model for the next request.
    with httpx.stream("POST", f"{daemon.url}/v1/completions", timeout=60,
                      json={"model": model_id, "prompt": "Hello", "max_tokens": 100,
                            "stream": True}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                break
    assert 200 == complete(daemon, model_id).status_code

    # A worker that dies is noticed; the model can be loaded again.
    os.kill(pid, signal.SIGKILL)
    died = daemon.wait_for("worker_exited", model=model_id)
    assert pid == died["pid"]
    after = view(daemon, model_id)
    assert after["loaded"] is False and "stopped unexpectedly" in after["error"]
    r = httpx.post(f"{daemon.url}/model/{model_id}/load", timeout=60)
    assert 200 == r.status_code, r.text
    assert 200 == complete(daemon, model_id).status_code

    r = httpx.post(f"{daemon.url}/model/{model_id}/unload", timeout=60)
    assert 200 == r.status_code and r.json()["loaded"] is False
    assert runtime == r.json()["runtime"]  # the one that would run it
    loaded = [e["pid"] for e in daemon.events("model_loaded") if e["model"] == model_id]
    assert not psutil.pid_exists(loaded[-1]) or (
        psutil.Process(loaded[-1]).status() == psutil.STATUS_ZOMBIE)


def test_auto_picks_llama_cpp(served: tuple[Daemon, dict[str, str]]) -> None:
    daemon, ids = served
    assert "llama.cpp" == view(daemon, ids["auto"])["runtime"]


def test_ctransformers_refuses_json_and_embeddings(served: tuple[Daemon, dict[str, str]]) -> None:
    daemon, ids = served
    model_id = ids["ctransformers"]
    r = complete(daemon, model_id, response_format={"type": "json_object"})
    assert (400, "response_format_unsupported") == (r.status_code, r.json()["error"]["code"])
    r = httpx.post(f"{daemon.url}/v1/embeddings", json={"model": model_id, "input": "hi"},
                   timeout=60)
    assert (400, "embeddings_unsupported") == (r.status_code, r.json()["error"]["code"])


def test_json_object_and_embeddings_on_llama_cpp(served: tuple[Daemon, dict[str, str]]) -> None:
    daemon, ids = served
    model_id = ids["auto"]
    # Accepted (the random vocabulary of the tiny file defeats the grammar; the JSON itself
    # is checked on a real model in test_gemma_e2e.py).
    r = complete(daemon, model_id, response_format={"type": "json_object"}, max_tokens=30,
                 temperature=0)
    assert 200 == r.status_code, r.text
    r = httpx.post(f"{daemon.url}/v1/embeddings", timeout=60,
                   json={"model": model_id, "input": ["hi", "there"]})
    assert 200 == r.status_code, r.text
    assert [64, 64] == [len(d["embedding"]) for d in r.json()["data"]]
    r = httpx.post(f"{daemon.url}/v1/embeddings", json={"model": model_id, "input": []})
    assert 400 == r.status_code


def test_runtime_is_updatable_and_checked(served: tuple[Daemon, dict[str, str]],
                                          tmp_path: Path) -> None:
    daemon, _ids = served
    model_id = create(daemon, "relabelled")
    # falcon: llama.cpp runs it, ctransformers does not.
    assert 200 == upload(daemon, model_id,
                         write_tiny_llama(tmp_path / "f.gguf", architecture="falcon")).status_code
    assert ("llama.cpp", "falcon") == (view(daemon, model_id)["runtime"],
                                       view(daemon, model_id)["architecture"])
    r = httpx.post(f"{daemon.url}/model/update", json={"id": model_id, "runtime": "ctransformers"})
    assert 200 == r.status_code, r.text
    assert None is r.json().get("runtime")  # none would run it now
    r = httpx.post(f"{daemon.url}/model/{model_id}/load", timeout=60)
    assert 400 == r.status_code
    assert "'falcon' model, which ctransformers does not run" in r.json()["message"]
    r = httpx.post(f"{daemon.url}/model/update", json={"id": model_id, "runtime": "vllm"})
    assert 400 == r.status_code


def test_architecture_no_runtime_runs_is_refused_on_upload(
        served: tuple[Daemon, dict[str, str]], tmp_path: Path) -> None:
    daemon, _ids = served
    model_id = create(daemon, "unknown arch")
    # 16 MB: refused after its first MiB, while the client is still sending the rest.
    path = write_tiny_llama(tmp_path / "x.gguf", architecture="notanarch", extra_bytes=16_000_000)
    r = upload(daemon, model_id, path)
    assert 400 == r.status_code
    assert "'notanarch' model" in json.loads(r.text)["message"]
    assert view(daemon, model_id)["downloaded"] is False
    assert 200 == httpx.get(f"{daemon.url}/models").status_code  # the daemon is unharmed


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_chat_without_max_tokens_runs_past_16(served: tuple[Daemon, dict[str, str]],
                                              runtime: str) -> None:
    daemon, ids = served
    r = httpx.post(f"{daemon.url}/v1/chat/completions", timeout=60, json={
        "model": ids[runtime], "messages": [{"role": "user", "content": "Hi"}], "seed": 3,
        "temperature": 0.5})
    assert 200 == r.status_code, r.text
    answer = r.json()
    # The plain template (the tiny file has none) until "User:", the end of text or the
    # context (with this seed: the 128-token context of the file); never cut at 16 tokens.
    assert answer["usage"]["completion_tokens"] > 16, answer
