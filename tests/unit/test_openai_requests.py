import base64
import struct
from typing import Any

import pytest

from supervisor.api.embeddings import (
    EmbeddingInputError,
    embedding_response,
    parse_embedding_request,
)
from supervisor.api.openai_requests import OpenAIError, response_schema
from supervisor.chat_template import render

SCHEMA = {"type": "object", "properties": {"a": {"type": "string"}}}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, {"type": "object"}),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
         SCHEMA),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         {"type": "object"}),
    ],
)
def test_response_schema(body: dict[str, Any], expected: dict[str, Any] | None) -> None:
    assert expected == response_schema(body)


@pytest.mark.parametrize(
    "fmt", ["json", {"type": "xml"}, {"type": "json_schema"},
            {"type": "json_schema", "json_schema": {"schema": "no"}}])
def test_response_schema_refuses(fmt: Any) -> None:
    with pytest.raises(OpenAIError) as caught:
        response_schema({"response_format": fmt})
    assert (400, "response_format") == (caught.value.status, caught.value.param)


def test_chat_without_template_is_plain_and_has_no_hard_coded_tokens() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert "System: Be brief.\nUser: Hi\nAssistant:" == render(None, messages)
    template = "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    assert "Be brief.Hi" == render(template, messages)


def test_embedding_request_shapes() -> None:
    assert (["a"], "float") == parse_embedding_request({"input": "a"})
    assert (["a", "b"], "base64") == parse_embedding_request(
        {"input": ["a", "b"], "encoding_format": "base64"})
    for bad in ({"input": []}, {"input": [1, 2]}, {"input": ""}, {},
                {"input": "a", "encoding_format": "int8"}, {"input": "a", "dimensions": 8}):
        with pytest.raises(EmbeddingInputError):
            parse_embedding_request(bad)


def test_embedding_response_encodes_base64_float32() -> None:
    body = embedding_response("m", [[1.0, -0.5]], 3, "base64")
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert (1.0, -0.5) == struct.unpack("<2f", raw)
    assert {"prompt_tokens": 3, "total_tokens": 3} == body["usage"]
    assert [[1.0, -0.5]] == [d["embedding"] for d in embedding_response("m", [[1.0, -0.5]], 3,
                                                                         "float")["data"]]
