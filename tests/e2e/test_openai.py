"""The OpenAI-compatible API through a real daemon, with the official `openai` client."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.daemon import Daemon
from tests.e2e.conftest import DaemonFactory
from tests.gguf_factory import write_tiny_llama

TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def import_model(daemon: Daemon, path: Path, name: str) -> str:
    r = httpx.post(f"{daemon.url}/models/create", json={"name": name})
    assert 200 == r.status_code, r.text
    model_id: str = r.json()["id"]
    r = httpx.put(f"{daemon.url}/model/{model_id}/file", content=path.read_bytes(),
                  headers={"content-type": "application/octet-stream"}, timeout=60)
    assert 200 == r.status_code, r.text
    return model_id


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str, str]]:
    tmp = tmp_path_factory.mktemp("openai")
    daemon = Daemon(tmp / "d", runtime={"max_loaded": 2, "threads": 1})
    daemon.start()
    try:
        chat = import_model(daemon, write_tiny_llama(tmp / "chat.gguf", seed=3,
                                                     chat_template=TEMPLATE), "Tiny Chat")
        plain = import_model(daemon, write_tiny_llama(tmp / "plain.gguf", seed=4), "Tiny")
        yield daemon, chat, plain
        assert 0 == daemon.stop()
    finally:
        daemon.close()


def client_for(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0,
                         timeout=60)


def test_models_list_and_completions(served: tuple[Daemon, str, str]) -> None:
    daemon, chat, plain = served
    client = client_for(daemon)
    ids = {m.id for m in client.models.list()}
    assert {chat, plain} <= ids
    assert plain == client.models.retrieve(plain).id

    done = client.completions.create(model=plain, prompt="Hello", max_tokens=8, seed=1,
                                     temperature=0.5)
    assert "text_completion" == done.object
    assert 1 == len(done.choices)
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage is not None
    assert done.usage.prompt_tokens > 0
    assert 0 < done.usage.completion_tokens <= 8
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    # It really ran in a worker: the model is loaded now.
    assert httpx.get(f"{daemon.url}/model/{plain}").json()["loaded"] is True

    pieces = []
    for event in client.completions.create(model=plain, prompt="Hello", max_tokens=8, seed=1,
                                           temperature=0.5, stream=True):
        pieces.append(event.choices[0].text)
    assert "".join(pieces) == done.choices[0].text  # same seed, same text


def test_chat_completions_with_the_models_template(served: tuple[Daemon, str, str]) -> None:
    daemon, chat, plain = served
    client = client_for(daemon)
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hi"}]
    for model in (chat, plain):
        answer = client.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                                max_tokens=6, seed=2)
        assert "chat.completion" == answer.object
        assert "assistant" == answer.choices[0].message.role
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        deltas = []
        roles = []
        for chunk in client.chat.completions.create(
            model=model, messages=messages, max_tokens=6, seed=2, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        ):
            if chunk.choices:
                roles.append(chunk.choices[0].delta.role)
                deltas.append(chunk.choices[0].delta.content or "")
            else:
                assert chunk.usage is not None
                assert answer.usage.completion_tokens == chunk.usage.completion_tokens
        assert "assistant" == roles[0]
        assert answer.choices[0].message.content == "".join(deltas)
    # The template's prompt is longer than the plain one for the same messages.
    with_template = client.chat.completions.create(model=chat, messages=messages,  # type: ignore[arg-type]
                                                   max_tokens=1)
    without = client.chat.completions.create(model=plain, messages=messages,  # type: ignore[arg-type]
                                             max_tokens=1)
    assert with_template.usage and without.usage
    assert with_template.usage.prompt_tokens != without.usage.prompt_tokens


def test_concurrent_requests_to_one_model_all_succeed(served: tuple[Daemon, str, str]) -> None:
    daemon, _chat, plain = served
    client = client_for(daemon)
    results: list[str] = []
    errors: list[BaseException] = []

    def one(n: int) -> None:
        try:
            r = client.completions.create(model=plain, prompt=f"Request {n}", max_tokens=5)
            results.append(r.choices[0].text)
        except BaseException as exc:  # collected, then asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [] == errors
    assert 6 == len(results)


def test_emoji_and_cjk_prompts_do_not_crash_the_worker(served: tuple[Daemon, str, str]) -> None:
    daemon, _chat, plain = served
    client = client_for(daemon)
    # Loaded first (an earlier test may have left it unloaded), so that a reload shows.
    assert 200 == httpx.post(f"{daemon.url}/model/{plain}/load", timeout=60).status_code
    before = httpx.get(f"{daemon.url}/model/{plain}").json()
    assert before["loaded"] is True
    prompt = "🙂🚀漢字かな" * 3
    answer = client.completions.create(model=plain, prompt=prompt, max_tokens=4)
    assert answer.usage is not None and answer.usage.prompt_tokens > len(prompt)
    after = httpx.get(f"{daemon.url}/model/{plain}").json()
    assert after["loaded"] is True
    assert [] == daemon.events("worker_exited")
    assert before.get("loadSeconds") == after.get("loadSeconds")  # same worker, no reload


def test_openai_shaped_errors(served: tuple[Daemon, str, str]) -> None:
    daemon, _chat, plain = served
    client = client_for(daemon)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert "model_not_found" == missing.value.code
    with pytest.raises(openai.BadRequestError) as long_prompt:
        client.completions.create(model=plain, prompt="word " * 400, max_tokens=1)
    message = str(long_prompt.value.message)
    assert "128" in message and "tokens" in message  # the numbers, context 128
    r = httpx.post(f"{daemon.url}/v1/completions", content=b"{oops",
                   headers={"content-type": "application/json"})
    assert 400 == r.status_code
    assert {"message", "type", "param", "code"} == set(r.json()["error"])
    r = httpx.post(f"{daemon.url}/v1/completions", json={"model": plain})
    assert ("prompt", 400) == (r.json()["error"]["param"], r.status_code)
    r = httpx.get(f"{daemon.url}/v1/models", headers={"origin": "https://evil.example"})
    assert 403 == r.status_code
    assert r.json()["error"]["message"]
    assert [] == daemon.events("request_crashed")


@pytest.mark.slow
def test_a_disconnecting_stream_frees_the_worker(make_daemon: DaemonFactory,
                                                  tmp_path: Path) -> None:
    daemon = make_daemon(runtime={"threads": 1}).start()
    # A slower model (about 100 MB of weights, long context) so a stream lasts seconds.
    big = write_tiny_llama(tmp_path / "big.gguf", seed=5, context_length=2048,
                           extra_bytes=100_000_000)
    model = import_model(daemon, big, "Slow")
    with httpx.Client(timeout=60) as http:
        # How fast this model makes tokens here, so the check below means something.
        t0 = time.monotonic()
        r = http.post(f"{daemon.url}/v1/completions",
                      json={"model": model, "prompt": "Once", "max_tokens": 100, "seed": 1})
        per_token = (time.monotonic() - t0) / max(1, r.json()["usage"]["completion_tokens"])
        assert 1500 * per_token > 3.0  # the abandoned stream alone would outlast the bound
        with http.stream("POST", f"{daemon.url}/v1/completions",
                         json={"model": model, "prompt": "Once", "max_tokens": 1500,
                               "stream": True}) as events:
            assert 200 == events.status_code
            lines = events.iter_lines()
            got = [line for line, _ in zip(lines, range(3), strict=False)]
            assert got
        # The client went away after a few pieces; the next request gets the worker at once.
        t0 = time.monotonic()
        r = http.post(f"{daemon.url}/v1/completions",
                      json={"model": model, "prompt": "Hi", "max_tokens": 2})
        elapsed = time.monotonic() - t0
    assert 200 == r.status_code, r.text
    assert elapsed < 3.0, elapsed
    assert 0 == daemon.stop()


def test_stop_sequences_end_the_text_early(served: tuple[Daemon, str, str]) -> None:
    daemon, _chat, plain = served
    client = client_for(daemon)
    full = client.completions.create(model=plain, prompt="Hello", max_tokens=24, seed=11,
                                     temperature=0.5).choices[0].text
    assert len(full) > 4
    # Two characters from the second half that are text: random weights also make invalid
    # UTF-8, shown as U+FFFD, which is no character of the model's own output to stop at.
    half = len(full) // 2
    start = next(i for i in range(half, len(full) - 1)
                 if "\ufffd" not in full[i:i + 2])
    stop = full[start:start + 2]
    cut = client.completions.create(model=plain, prompt="Hello", max_tokens=24, seed=11,
                                    temperature=0.5, stop=[stop])
    text = cut.choices[0].text
    assert "stop" == cut.choices[0].finish_reason
    assert stop not in text
    assert full.startswith(text)
    assert len(text) < len(full)
