"""An OpenAI-compatible API on loaded models: /v1/models, /v1/completions, /v1/chat/completions.

Generation runs in the model's worker process, one request at a time per model (ctransformers
must never be called concurrently); waiting requests are bounded, and a client that goes away
cancels its generation between two pieces. Errors use OpenAI's error shape.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import jinja2
import structlog
import trio
from jinja2.sandbox import ImmutableSandboxedEnvironment
from quart import Response, current_app, jsonify
from quart_trio import QuartTrio

from actors import messages as m
from actors.errors import Conflict, ModelError
from actors.generation import GenerationStream
from actors.messages import ModelView
from actors.spec import is_valid_id
from actors.state import State, flags
from actors.worker import GenerateParams, GenerationResult
from supervisor.api.app import json_reply, status_for
from supervisor.api.models import answer_within, read_json_body
from supervisor.config import Config
from supervisor.registry import Registry

log = structlog.get_logger("modeld.openai")

QUEUE_LIMIT = 8  # requests waiting for one model before 429
BODY_START_GRACE = 10.0  # seconds a streamed response's body has to start before it is freed
DEFAULT_MAX_TOKENS = 16
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}System: {{ m.content }}\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n"
    "{% else %}Assistant: {{ m.content }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class _Lease:
    """A streamed generation and its queue slot, given back exactly once: when the body ends,
    or, if the server never starts the body (the client went away between the handler's
    return and the first byte), by a guard after BODY_START_GRACE."""

    def __init__(self, stream: GenerationStream, release: Callable[[], None]) -> None:
        self.stream = stream
        self.started = trio.Event()
        self._release = release
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
        finally:
            self._release()

    async def guard(self) -> None:
        with trio.move_on_after(BODY_START_GRACE):
            await self.started.wait()
            return
        log.info("stream_abandoned", model=self.stream.model_id,
                 reason="the response body never started")
        await self.close()


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param,
                          "code": self.code}}


def _field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = data.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise OpenAIError(400, f"'{name}' has the wrong type", param=name, code="invalid_type")
    if not isinstance(value, kind):
        raise OpenAIError(400, f"'{name}' has the wrong type", param=name, code="invalid_type")
    return value


@attrs.frozen
class Sampling:
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int
    stream: bool


def parse_sampling(data: dict[str, Any]) -> Sampling:
    max_tokens = _field(data, "max_tokens", int, None)
    if max_tokens is None:
        max_tokens = _field(data, "max_completion_tokens", int, None)
    if max_tokens is not None and max_tokens < 1:
        raise OpenAIError(400, "'max_tokens' must be at least 1", param="max_tokens")
    temperature = float(_field(data, "temperature", (int, float), 0.8))
    if not 0 <= temperature <= 2:
        raise OpenAIError(400, "'temperature' must be between 0 and 2", param="temperature")
    top_p = float(_field(data, "top_p", (int, float), 0.95))
    if not 0 < top_p <= 1:
        raise OpenAIError(400, "'top_p' must be in (0, 1]", param="top_p")
    top_k = _field(data, "top_k", int, 40)
    if top_k < 0:
        raise OpenAIError(400, "'top_k' must not be negative", param="top_k")
    stop_raw = data.get("stop")
    if stop_raw is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_raw, str):
        stop = (stop_raw,)
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw):
        if len(stop_raw) > 4:
            raise OpenAIError(400, "at most 4 stop sequences", param="stop")
        stop = tuple(s for s in stop_raw if s)
    else:
        raise OpenAIError(400, "'stop' must be a string or a list of strings", param="stop")
    seed = _field(data, "seed", int, -1)
    stream = _field(data, "stream", bool, False)
    return Sampling(max_tokens, temperature, top_p, top_k, stop, seed, stream)


def prompt_of(data: dict[str, Any]) -> str:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise OpenAIError(400, "'prompt' must be a string", param="prompt")
    return prompt


def messages_of(data: dict[str, Any]) -> list[dict[str, str]]:
    raw = data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise OpenAIError(400, "'messages' must be a non-empty list", param="messages")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise OpenAIError(400, f"messages[{i}] must be an object", param="messages")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise OpenAIError(400, f"messages[{i}].role is not a known role", param="messages")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = [p.get("text") for p in content
                     if isinstance(p, dict) and p.get("type") == "text"]
            if not all(isinstance(t, str) for t in texts):
                raise OpenAIError(400, f"messages[{i}].content is malformed", param="messages")
            content = "".join(t for t in texts if isinstance(t, str))
        if not isinstance(content, str):
            raise OpenAIError(400, f"messages[{i}].content must be a string", param="messages")
        messages.append({"role": "system" if role == "developer" else role,
                         "content": content})
    return messages


_env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


def _raise(message: str) -> None:
    raise OpenAIError(400, f"the model's chat template refused the messages: {message}",
                      param="messages")


def render_chat(template: str | None, messages: list[dict[str, str]]) -> str:
    """The prompt for `messages`: the GGUF's chat template (sandboxed), else PLAIN_TEMPLATE."""
    source = template or PLAIN_TEMPLATE
    try:
        compiled = _env.from_string(source)
        return compiled.render(messages=messages, add_generation_prompt=True,
                               bos_token="<s>", eos_token="</s>", raise_exception=_raise)
    except OpenAIError:
        raise
    except jinja2.TemplateError as exc:
        if template is None:
            raise
        log.warning("chat_template_failed", reason=str(exc))
        return _env.from_string(PLAIN_TEMPLATE).render(messages=messages,
                                                       add_generation_prompt=True)


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def _finish_reason(result: GenerationResult | None) -> str:
    return "length" if result is not None and result.finish_reason == "length" else "stop"


def _usage(result: GenerationResult | None) -> dict[str, int]:
    prompt = result.prompt_tokens if result else 0
    completion = result.completion_tokens if result else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _as_openai(exc: ModelError) -> OpenAIError:
    status = status_for(exc)
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 410:
        status, kind = 404, "invalid_request_error"
    return OpenAIError(status, str(exc), type_=kind, code=exc.code)


def register_openai(app: QuartTrio, registry: Registry, config: Config) -> None:
    """The /v1 routes. Their errors (guard refusals included) are in OpenAI's shape."""
    load_wait = config.runtime.load_timeout + 30
    busy: dict[str, int] = {}  # requests running or waiting, per model

    @app.errorhandler(OpenAIError)
    async def on_openai_error(exc: OpenAIError) -> Response:
        response = jsonify(exc.body())
        response.status_code = exc.status
        return response

    async def listed() -> list[ModelView]:
        views = registry.views()
        return [v for v in views if flags(v.state).downloaded]

    def model_object(view: ModelView) -> dict[str, Any]:
        return {"id": view.spec.id, "object": "model",
                "created": int(view.spec.created.timestamp()), "owned_by": "modeld"}

    @app.get("/v1/models")
    async def list_models() -> Response:
        return json_reply({"object": "list", "data": [model_object(v) for v in await listed()]})

    @app.get("/v1/models/<model>")
    async def get_model(model: str) -> Response:
        for view in await listed():
            if view.spec.id == model:
                return json_reply(model_object(view))
        raise OpenAIError(404, f"the model '{model}' does not exist or is not downloaded",
                          param="model", code="model_not_found")

    async def loaded_view(model_id: str) -> ModelView:
        """The model, loaded (loading it if it is only downloaded)."""
        if not is_valid_id(model_id):
            raise OpenAIError(404, f"the model '{model_id}' does not exist", param="model",
                              code="model_not_found")
        try:
            view = registry.view(model_id)
            if not flags(view.state).downloaded:
                raise OpenAIError(
                    404, f"the model '{model_id}' is not downloaded; download it first "
                    f"(POST /model/{model_id}/download)", param="model", code="model_not_found")
            if view.state is not State.LOADED:
                with answer_within(load_wait):
                    view = await registry.call(model_id, lambda r: m.Load(reply=r))
        except ModelError as exc:
            raise _as_openai(exc) from None
        return view

    async def open_stream(model_id: str, prompt: str, sampling: Sampling) -> tuple[
            GenerationStream, str | None, ModelView]:
        view = await loaded_view(model_id)
        context = (view.facts.context_length if view.facts else None) or 0
        limit = sampling.max_tokens or DEFAULT_MAX_TOKENS
        params = GenerateParams(
            max_new_tokens=min(limit, context) if context else limit,
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            seed=sampling.seed, stop=sampling.stop)
        for attempt in range(2):
            try:
                with answer_within(30):
                    stream = await registry.generate(model_id, prompt, params)
                break
            except Conflict:
                if attempt:  # unloaded (evicted) again between load and generate
                    raise OpenAIError(503, f"the model '{model_id}' keeps being unloaded; "
                                      "try again", type_="server_error", code="not_loaded"
                                      ) from None
                view = await loaded_view(model_id)
            except ModelError as exc:
                raise _as_openai(exc) from None
        # The first piece before any header: a refused prompt is still a clean 400.
        try:
            first: str | None = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        except ModelError as exc:
            await stream.aclose()
            raise _as_openai(exc) from None
        except BaseException:
            await stream.aclose()
            raise
        return stream, first, view

    def admit(model_id: str) -> None:
        if busy.get(model_id, 0) > QUEUE_LIMIT:
            raise OpenAIError(429, f"too many requests are waiting for '{model_id}'; retry "
                              "shortly", type_="rate_limit_error", code="queue_full")
        busy[model_id] = busy.get(model_id, 0) + 1

    def release(model_id: str) -> None:
        busy[model_id] -= 1
        if not busy[model_id]:
            del busy[model_id]

    async def generate(model_id: str, prompt: str, sampling: Sampling, *, chat: bool,
                       include_usage: bool) -> Response:
        admit(model_id)
        try:
            stream, first, _view = await open_stream(model_id, prompt, sampling)
        except BaseException:
            release(model_id)
            raise
        kind = "chat.completion" if chat else "text_completion"
        ident, created = new_id("chatcmpl" if chat else "cmpl"), now()

        def choice(text: str | None, finish: str | None, *, delta: bool) -> dict[str, Any]:
            if chat and delta:
                body: dict[str, Any] = {"delta": {} if text is None else {"content": text}}
            elif chat:
                body = {"message": {"role": "assistant", "content": text or ""}}
            else:
                body = {"text": text or "", "logprobs": None}
            return {"index": 0, **body, "finish_reason": finish}

        if not sampling.stream:
            try:
                pieces = [] if first is None else [first]
                async with stream:
                    async for piece in stream:
                        pieces.append(piece)
            except ModelError as exc:
                raise _as_openai(exc) from None
            finally:
                release(model_id)
            return json_reply({
                "id": ident, "object": kind, "created": created, "model": model_id,
                "choices": [choice("".join(pieces), _finish_reason(stream.result),
                                   delta=False)],
                "usage": _usage(stream.result),
            })

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None) -> bytes:
            return sse({"id": ident, "object": chunk_kind, "created": created,
                        "model": model_id, "choices": [choice(text, finish, delta=True)]})

        lease = _Lease(stream, lambda: release(model_id))

        async def events() -> AsyncIterator[bytes]:
            lease.started.set()
            try:
                if chat:
                    yield sse({"id": ident, "object": chunk_kind, "created": created,
                               "model": model_id,
                               "choices": [{"index": 0, "delta": {"role": "assistant"},
                                            "finish_reason": None}]})
                if first is not None:
                    yield chunk(first, None)
                async for piece in stream:
                    yield chunk(piece, None)
                yield chunk(None if chat else "", _finish_reason(stream.result))
                if include_usage:
                    yield sse({"id": ident, "object": chunk_kind, "created": created,
                               "model": model_id, "choices": [],
                               "usage": _usage(stream.result)})
                yield sse("[DONE]")
            except ModelError as exc:
                yield sse(_as_openai(exc).body())
            finally:
                await lease.close()

        current_app.add_background_task(lease.guard)
        response = Response(events(), content_type="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.timeout = None  # a long generation is not a stuck response
        return response

    async def body_of() -> dict[str, Any]:
        try:
            data = await read_json_body()
        except ModelError as exc:
            raise OpenAIError(status_for(exc), str(exc), code=exc.code) from None
        if not isinstance(data, dict):
            raise OpenAIError(400, "the body must be a JSON object")
        return data

    def model_of(data: dict[str, Any]) -> str:
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise OpenAIError(400, "'model' is required", param="model")
        return model

    def include_usage(data: dict[str, Any]) -> bool:
        options = data.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    @app.post("/v1/completions")
    async def completions() -> Response:
        data = await body_of()
        model_id, sampling, prompt = model_of(data), parse_sampling(data), prompt_of(data)
        return await generate(model_id, prompt, sampling, chat=False,
                              include_usage=include_usage(data))

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        data = await body_of()
        model_id, sampling, messages = model_of(data), parse_sampling(data), messages_of(data)
        view = await loaded_view(model_id)
        template = view.facts.chat_template if view.facts else None
        prompt = render_chat(template, messages)
        return await generate(model_id, prompt, sampling, chat=True,
                              include_usage=include_usage(data))
