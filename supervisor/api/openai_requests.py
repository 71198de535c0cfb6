"""What a /v1 request asks for: its sampling, prompt or messages, output format; and the
OpenAI-shaped error for a request that does not fit."""

from __future__ import annotations

from typing import Any

import attrs


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


def response_schema(data: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema `response_format` asks the output to follow, or None for free text.
    json_object is any JSON object."""
    fmt = data.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            return schema
        if isinstance(spec, dict) and schema is None:
            return {"type": "object"}
    raise OpenAIError(400, "'response_format' must be {\"type\": \"text\"}, "
                      "{\"type\": \"json_object\"} or {\"type\": \"json_schema\", "
                      "\"json_schema\": {\"schema\": {...}}}", param="response_format")
