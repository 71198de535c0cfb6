"""The shapes of OpenAI's /v1/embeddings: the request's input and the answer's vectors."""

from __future__ import annotations

import base64
import struct
from typing import Any

MAX_INPUTS = 256  # texts in one request
MAX_TEXT = 1024 * 1024  # characters in one text (the JSON body is at most 1 MiB anyway)


class EmbeddingInputError(ValueError):
    """The request is malformed; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def parse_embedding_request(data: dict[str, Any]) -> tuple[list[str], str]:
    """The texts to embed and the encoding_format ("float" or "base64").

    `input` is a string or a list of strings (token arrays are refused: modeld's models take
    text). Raises EmbeddingInputError.
    """
    raw = data.get("input")
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        texts = list(raw)
    else:
        raise EmbeddingInputError(
            "'input' must be a string or a non-empty list of strings", "input"
        )
    if len(texts) > MAX_INPUTS:
        raise EmbeddingInputError(f"at most {MAX_INPUTS} inputs in one request", "input")
    if any(not t for t in texts):
        raise EmbeddingInputError("'input' must not hold empty strings", "input")
    encoding = data.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise EmbeddingInputError(
            "'encoding_format' must be 'float' or 'base64'", "encoding_format"
        )
    dimensions = data.get("dimensions")
    if dimensions is not None:
        raise EmbeddingInputError(
            "'dimensions' is not supported: the model's vectors have its own size", "dimensions"
        )
    return texts, str(encoding)


def encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    """A vector as OpenAI sends it: floats, or base64 of little-endian float32."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def embedding_response(
    model_id: str, vectors: list[list[float]], prompt_tokens: int, encoding: str
) -> dict[str, Any]:
    return {
        "object": "list",
        "model": model_id,
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, encoding)}
            for i, v in enumerate(vectors)
        ],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
