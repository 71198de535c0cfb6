"""An OpenAI-compatible API on loaded models: /v1/models, /v1/completions,
/v1/chat/completions, /v1/embeddings.

Generation runs in the model's worker process: as many requests at a time as the loaded model
has slots (llama.cpp: `parallel`; ctransformers: one, it must never be called concurrently).
Waiting requests are bounded per slot, and a client that goes away cancels its generation
between two pieces. Chat on a llama.cpp model whose file has a chat template is rendered by
llama.cpp with that template; otherwise modeld renders the template (or, for a file without
one, PLAIN_TEMPLATE). Either way modeld renders it first in a renderer process with limits
(supervisor/chat_renderer.py): a template that goes beyond one is a 400 before any worker sees
it. Errors use OpenAI's error shape.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
import trio
from quart import Response, current_app, jsonify
from quart_trio import QuartTrio

from actors import messages as m
from actors.errors import Conflict, ModelError
from actors.generation import GenerationStream
from actors.keepalive import DEFAULT, KeepAliveArg, parse_keep_alive
from actors.messages import ModelView
from actors.runtimes import LLAMA_CPP
from actors.spec import is_valid_id
from actors.state import State, flags
from actors.worker import GenerateParams, GenerationResult
from supervisor.api.app import METRICS, json_reply, status_for
from supervisor.api.embeddings import (
    EmbeddingInputError,
    embedding_response,
    parse_embedding_request,
)
from supervisor.api.models import answer_within, read_json_body
from supervisor.api.openai_requests import (
    OpenAIError,
    Sampling,
    messages_of,
    parse_sampling,
    prompt_of,
    response_schema,
)
from supervisor.chat_template import FAILED, PLAIN_TURN_END, TemplateRefused
from supervisor.config import Config
from supervisor.metrics import Metrics
from supervisor.registry import Registry

log = structlog.get_logger("modeld.openai")

QUEUE_LIMIT = 8  # requests waiting per slot of a model before 429
BODY_START_GRACE = 10.0  # seconds a streamed response's body has to start before it is freed
DEFAULT_MAX_TOKENS = 16
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
    load_wait = config.runtime.load_wait + config.runtime.load_timeout + 30
    busy: dict[str, int] = {}  # requests running or waiting, per model

    metrics: Metrics = app.extensions[METRICS]

    def count_tokens(model_id: str, result: GenerationResult | None) -> None:
        if result is not None:
            label = metrics.model(model_id)
            metrics.generated_tokens.labels(label).inc(result.completion_tokens)
            metrics.prompt_tokens.labels(label).inc(result.prompt_tokens)

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

    async def loaded_view(model_id: str, keep_alive: KeepAliveArg) -> ModelView:
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
                    view = await registry.call(
                        model_id, lambda r: m.Load(reply=r, keep_alive=keep_alive))
        except ModelError as exc:
            raise _as_openai(exc) from None
        return view

    async def open_stream(model_id: str, prompt: str, sampling: Sampling, *, chat: bool,
                          messages: list[dict[str, str]] | None,
                          schema: dict[str, Any] | None, keep_alive: KeepAliveArg) -> tuple[
            GenerationStream, str | None, ModelView]:
        view = await loaded_view(model_id, keep_alive)
        if schema is not None and view.runtime != LLAMA_CPP:
            raise OpenAIError(400, f"'{model_id}' runs on {view.runtime}, which cannot "
                              "constrain output; 'response_format' needs the llama.cpp "
                              "runtime", param="response_format",
                              code="response_format_unsupported")
        context = view.context_length or (view.facts.context_length if view.facts else 0) or 0
        # Chat without max_tokens runs to the end of the turn or the context (OpenAI's
        # default); legacy completions keep their 16.
        limit = sampling.max_tokens or (context if chat and context else DEFAULT_MAX_TOKENS)
        template = view.facts.chat_template if view.facts else None
        rendered_by_runtime = (messages is not None and template is not None
                               and view.runtime == LLAMA_CPP)
        stop = sampling.stop
        if messages is not None:
            rendered = await render_prompt(model_id, template, messages,
                                           judge_failures=not rendered_by_runtime)
            if not rendered_by_runtime:
                prompt = rendered
                if template is None:  # the plain template: the next "User:" line ends the turn
                    stop = (*stop, PLAIN_TURN_END)
        params = GenerateParams(
            max_new_tokens=min(limit, context) if context else limit,
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            seed=sampling.seed, stop=stop,
            messages=tuple((m_["role"], m_["content"]) for m_ in messages)
            if rendered_by_runtime and messages is not None else None,
            json_schema=schema)
        for attempt in range(2):
            try:
                with answer_within(30):
                    stream = await registry.generate(model_id, prompt, params, keep_alive)
                break
            except Conflict:
                if attempt:  # unloaded (evicted) again between load and generate
                    raise OpenAIError(503, f"the model '{model_id}' keeps being unloaded; "
                                      "try again", type_="server_error", code="not_loaded"
                                      ) from None
                view = await loaded_view(model_id, keep_alive)
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

    async def render_prompt(model_id: str, template: str | None,
                            messages: list[dict[str, str]], *, judge_failures: bool) -> str:
        """The chat prompt, rendered off the event loop within limits; a template beyond a
        limit (or one that fails, unless llama.cpp is to render it its own way) is a 400."""
        try:
            return await registry.renderer.render(template, messages)
        except TemplateRefused as exc:
            if exc.kind == FAILED and not judge_failures:
                return ""  # llama.cpp's engine renders it, and reports its own errors
            log.warning("chat_template_failed", model=model_id, reason=str(exc))
            raise OpenAIError(400, str(exc), param="messages",
                              code=f"chat_template_{exc.kind}") from None

    def slots(model_id: str) -> int:
        try:
            return max(1, registry.view(model_id).slots)
        except ModelError:
            return 1  # the request fails later with the right error

    def admit(model_id: str) -> None:
        if busy.get(model_id, 0) > QUEUE_LIMIT * slots(model_id):
            raise OpenAIError(429, f"too many requests are waiting for '{model_id}'; retry "
                              "shortly", type_="rate_limit_error", code="queue_full")
        busy[model_id] = busy.get(model_id, 0) + 1

    def release(model_id: str) -> None:
        busy[model_id] -= 1
        if not busy[model_id]:
            del busy[model_id]

    async def generate(model_id: str, prompt: str, sampling: Sampling, *, chat: bool,
                       include_usage: bool, keep_alive: KeepAliveArg,
                       messages: list[dict[str, str]] | None = None,
                       schema: dict[str, Any] | None = None) -> Response:
        admit(model_id)
        began = time.perf_counter()
        try:
            stream, first, _view = await open_stream(model_id, prompt, sampling, chat=chat,
                                                     messages=messages, schema=schema,
                                                     keep_alive=keep_alive)
        except BaseException:
            release(model_id)
            raise
        if first is not None:
            metrics.time_to_first_token.labels(metrics.model(model_id)).observe(
                time.perf_counter() - began)
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
            count_tokens(model_id, stream.result)
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
                count_tokens(model_id, stream.result)

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

    def keep_alive_of(data: dict[str, Any]) -> KeepAliveArg:
        """The request's `keep_alive` extra (Ollama's: "5m", 0 unloads after the request,
        -1 keeps the model); DEFAULT when it gives none."""
        value = data.get("keep_alive")
        if value is None:
            return DEFAULT
        try:
            return parse_keep_alive(value)
        except ValueError as exc:
            raise OpenAIError(400, f"'keep_alive': {exc}", param="keep_alive") from None

    def include_usage(data: dict[str, Any]) -> bool:
        options = data.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    @app.post("/v1/completions")
    async def completions() -> Response:
        data = await body_of()
        model_id, sampling, prompt = model_of(data), parse_sampling(data), prompt_of(data)
        return await generate(model_id, prompt, sampling, chat=False,
                              include_usage=include_usage(data), schema=response_schema(data),
                              keep_alive=keep_alive_of(data))

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        data = await body_of()
        model_id, sampling, messages = model_of(data), parse_sampling(data), messages_of(data)
        return await generate(model_id, "", sampling, chat=True,
                              include_usage=include_usage(data), messages=messages,
                              schema=response_schema(data), keep_alive=keep_alive_of(data))

    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        data = await body_of()
        model_id = model_of(data)
        try:
            texts, encoding = parse_embedding_request(data)
        except EmbeddingInputError as exc:
            raise OpenAIError(400, str(exc), param=exc.param) from None
        keep_alive = keep_alive_of(data)
        view = await loaded_view(model_id, keep_alive)
        if view.runtime != LLAMA_CPP:
            raise OpenAIError(400, f"'{model_id}' runs on {view.runtime}, which gives no "
                              "embeddings; embeddings need the llama.cpp runtime",
                              param="model", code="embeddings_unsupported")
        admit(model_id)
        try:
            with answer_within(30):
                job = await registry.embedder(model_id, texts, keep_alive)
            result = await job.run()
        except ModelError as exc:
            raise _as_openai(exc) from None
        finally:
            release(model_id)
        return json_reply(embedding_response(model_id, result.vectors, result.prompt_tokens,
                                             encoding))
