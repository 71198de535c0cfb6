"""The OpenAPI 3.1 document of modeld's HTTP API, served at GET /openapi.json.

Built here, in code, so the enumerations come from the same sets the daemon validates with;
`supervisor/api/openapi.json` is the same document checked in for readers and tools
(regenerate it with `python -m supervisor.api.openapi > supervisor/api/openapi.json`).
tests/e2e/test_openapi.py keeps the document, the checked-in file, the app's routes and the
wire shapes from drifting apart, and runs schemathesis against a live daemon.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from quart import Response
from quart_trio import QuartTrio

from actors.spec import ID_PATTERN
from supervisor.api.openapi_schemas import Schema, ref, schemas

API_VERSION = "1"
ERRORS = {
    400: "malformed model id, or a body that is not valid (the message names the field)",
    401: "the token is missing or wrong ([server] token_file is set)",
    403: "the Host, Origin or Sec-Fetch-Site is not allowed",
    404: "no such endpoint (e.g. a model id with a '/' in it)",
    409: "the model's state does not allow this command, or the model is not custom",
    410: "no model with this id",
    413: "the JSON body is larger than 1 MiB",
    415: "the body's Content-Type is not the one this endpoint reads",
    500: "the operation itself failed (e.g. the worker died while loading)",
    503: "the model did not answer in time; try again",
    507: "not enough memory (or disk space) for this model",
}
ALWAYS = (401, 403, 500)


def _responses(ok: int, ok_schema: str | None, *errors: int,
               ok_description: str = "the model after the command") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if ok_schema is None:
        out[str(ok)] = {"description": ok_description}
    else:
        out[str(ok)] = {"description": ok_description,
                        "content": {"application/json": {"schema": ref(ok_schema)}}}
    for status in sorted({*errors, *ALWAYS}):
        out[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    return out


def _op(operation_id: str, summary: str, responses: dict[str, Any], *,
        tags: list[str], model: bool = True, body: Schema | None = None,
        body_required: bool = True, description: str | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": operation_id, "summary": summary, "tags": tags}
    if description:
        op["description"] = description
    if model:
        op["parameters"] = [{"$ref": "#/components/parameters/model"}]
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": body}
    op["responses"] = responses
    return op


def _json_body(name: str) -> Schema:
    return {"application/json": {"schema": ref(name)}}


COMMAND = (400, 404, 410, 413, 415, 503)


OPENAI_ERRORS = (400, 401, 403, 404, 409, 413, 415, 429, 500, 503, 507)


def _openai_op(operation_id: str, summary: str, ok: Schema, *, body: Schema | None = None,
               stream: bool = False, model: bool = False) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": ok}}
    if stream:
        content["text/event-stream"] = {"schema": {
            "type": "string",
            "description": "server-sent events: `data: <chunk JSON>` lines, then `data: [DONE]`",
        }}
    op: dict[str, Any] = {"operationId": operation_id, "summary": summary, "tags": ["OpenAI"]}
    if model:
        op["parameters"] = [{"name": "model", "in": "path", "required": True,
                             "schema": {"type": "string"}}]
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    op["responses"] = {"200": {"description": "OpenAI's shape", "content": content},
                       **{str(st): {"$ref": f"#/components/responses/EOpenAI{st}"}
                          for st in OPENAI_ERRORS}}
    return op


def _openai_paths() -> dict[str, Any]:
    sampling: dict[str, Schema] = {
        "model": {"type": "string"},
        "max_tokens": {"type": ["integer", "null"]},
        "temperature": {"type": ["number", "null"]},
        "top_p": {"type": ["number", "null"]},
        "top_k": {"type": ["integer", "null"]},
        "seed": {"type": ["integer", "null"]},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                           {"type": "null"}]},
        "stream": {"type": ["boolean", "null"]},
        "response_format": {"type": ["object", "null"]},
        "keep_alive": {"type": ["string", "number", "null"],
                       "description": "modeld (Ollama's): how long the model stays loaded "
                       "when idle after this request; 0 unloads it, -1 keeps it"},
    }
    loose: Schema = {"type": "object"}
    embeddings_body = {"type": "object", "required": ["model", "input"], "properties": {
        "model": {"type": "string"},
        "input": {"anyOf": [{"type": "string", "minLength": 1},
                            {"type": "array", "minItems": 1, "maxItems": 256,
                             "items": {"type": "string", "minLength": 1}}]},
        "encoding_format": {"enum": ["float", "base64", None]},
    }}
    completion_body = {"type": "object", "required": ["model", "prompt"],
                       "properties": {**sampling, "prompt": {"type": "string"}}}
    chat_body = {"type": "object", "required": ["model", "messages"], "properties": {
        **sampling,
        "messages": {"type": "array", "items": {
            "type": "object", "required": ["role", "content"],
            "properties": {"role": {"type": "string"}, "content": {"type": "string"}}}},
    }}
    return {
        "/v1/models": {"get": _openai_op("openai_list_models",
                                         "Downloaded and loaded models (OpenAI)", loose)},
        "/v1/models/{model}": {"get": _openai_op("openai_retrieve_model", "One model (OpenAI)",
                                                 loose, model=True)},
        "/v1/completions": {"post": _openai_op(
            "openai_completions", "Complete a prompt (OpenAI)", loose, body=completion_body,
            stream=True)},
        "/v1/chat/completions": {"post": _openai_op(
            "openai_chat_completions", "Answer a conversation (OpenAI)", loose, body=chat_body,
            stream=True)},
        "/v1/embeddings": {"post": _openai_op(
            "openai_embeddings", "Embedding vectors of texts (OpenAI; llama.cpp models)", loose,
            body=embeddings_body)},
    }


def build_document() -> dict[str, Any]:
    """The whole document, as a JSON-ready dict."""
    model_tag, models_tag = ["Model"], ["Models"]
    paths: dict[str, Any] = {
        "/model/{model}": {
            "get": _op("models_specific_model_snapshot", "The model now",
                       _responses(200, "Model", 400, 404, 410, 503), tags=model_tag),
        },
        "/model/{model}/download": {
            "post": _op(
                "model_specific_model_download", "Start the download (or join the running one)",
                _responses(200, "Model", *COMMAND, 409, 507), tags=model_tag,
                body=_json_body("DownloadOptions"), body_required=False,
                description="Returns at once with downloading: true, or downloaded: true when "
                "the file is already there. 409 when the model has no url. A catalog model "
                "with a source is resolved on the Hub first (400, 503 when it cannot be); 507 "
                "insufficient_storage, before any byte, when its known size does not fit on "
                "the storage filesystem (with a 64 MiB margin). With {\"update\": true} "
                "(modeld), a source-backed model's reference is resolved again and the answer's "
                "update says what came of it (400 no_source for a model without a source).",
            ),
        },
        "/model/{model}/download/cancel": {
            "post": _op("model_specific_model_download_cancel",
                        "Stop the running download (idempotent)",
                        _responses(200, "Model", *COMMAND), tags=model_tag),
        },
        "/model/{model}/download/progress": {
            "get": _op(
                "model_specific_model_download_progress", "Download progress",
                _responses(200, "ModelDownloadProgress", 400, 404, 410,
                           ok_description="one progress snapshot"),
                tags=model_tag,
                description="A plain GET returns one snapshot. A WebSocket upgrade on the same "
                "path streams ModelDownloadProgress messages (text frames): the current "
                "snapshot at once, then changes (at most ~10 a second), then a terminal one "
                "(COMPLETED, FAILED or CANCELED; COMPLETED or UNKNOWN when nothing runs) and a "
                "normal close (1000). A refused handshake gets the HTTP error instead of 101. "
                "With a token, a WebSocket may pass it as the subprotocol bearer.<token> or the "
                "query parameter token.",
            ),
        },
        "/model/{model}/load": {
            "post": _op("model_specific_model_load", "Load a downloaded model into memory",
                        _responses(200, "Model", *COMMAND, 409, 507), tags=model_tag,
                        body=_json_body("LoadOptions"), body_required=False,
                        description="Returns when loaded, or fails (409 when not downloaded). "
                        "The model stays loaded until it is unloaded, unless the optional "
                        "body gives a keepAlive. Idle models, least recently used first, are "
                        "unloaded to make room (max_loaded, memory; named in evicted); when "
                        "only models in use stand in the way it waits up to [runtime] "
                        "load_wait for one to be idle, then 503 all_busy or 507 "
                        "insufficient_memory with the numbers."),
        },
        "/model/{model}/unload": {
            "post": _op("model_specific_model_unload", "Free the model's memory (idempotent)",
                        _responses(200, "Model", *COMMAND), tags=model_tag),
        },
        "/model/{model}/file": {
            "put": _op(
                "modeld_model_import_file", "Upload the GGUF file of a custom model",
                _responses(200, "Model", 400, 404, 409, 410, 415, 503, 507), tags=model_tag,
                body={"application/octet-stream": {
                    "schema": {"type": "string", "contentMediaType": "application/octet-stream"}
                }},
                description="The body is checked (GGUF header) and published atomically. "
                "400 model_file_invalid when it is not a loadable GGUF file; 409 for a "
                "catalog model or while the model is busy.",
            ),
        },
        "/model/{model}/scores/increment": {
            "post": _op("model_scores_increment", "Count a use of the model",
                        _responses(204, None, 400, 410, 413, 415, 503,
                                   ok_description="counted"),
                        tags=model_tag, body=_json_body("SeededScoreIncrement")),
        },
        "/model/update": {
            "post": _op("model_update", "Update the metadata of a custom model",
                        _responses(200, "Model", 400, 409, 410, 413, 415, 503),
                        tags=model_tag, model=False, body=_json_body("ModelUpdate")),
        },
        "/models": {
            "get": _op("models_snapshot", "Every model",
                       _responses(200, "Models", ok_description="every model"),
                       tags=models_tag, model=False),
        },
        "/models/create": {
            "post": _op("models_create_new_model",
                        "Register a custom model (from a url, an upload, or a Hub source)",
                        _responses(200, "Model", 400, 409, 413, 415, 500, 503, 507,
                                   ok_description="the new model, with its id"),
                        tags=models_tag, model=False, body=_json_body("SeededModel")),
        },
        "/models/{model}/delete": {
            "post": _op("models_delete_specific_model",
                        "Unload, cancel, remove the files (and a custom model's record)",
                        _responses(204, None, *COMMAND, ok_description="deleted"),
                        tags=models_tag),
        },
        "/models/{model}/delete/cache": {
            "post": _op("models_delete_specific_model_cache",
                        "Unload, cancel and remove the files; keep the model (and its record)",
                        _responses(200, "ModelDeleteCacheOutput", *COMMAND, 415,
                                   ok_description="the model whose files were removed"),
                        tags=models_tag, body=_json_body("ModelDeleteCacheInput")),
        },
        "/models/unload": {
            "post": _op("unload_models", "Unload every model",
                        _responses(204, None, 400, 413, 415, ok_description="all unloaded"),
                        tags=models_tag, model=False),
        },
        **_openai_paths(),
        "/metrics": {
            "get": _op("modeld_metrics", "Prometheus metrics",
                       {"200": {"description": "Prometheus text exposition format 0.0.4; "
                                "every name starts with modeld_",
                                "content": {"text/plain": {"schema": {"type": "string"}}}},
                        **{str(s): {"$ref": f"#/components/responses/E{s}"} for s in (401, 403)}},
                       tags=["modeld"], model=False),
        },
        "/status": {
            "get": _op("modeld_status", "The daemon at a glance",
                       _responses(200, "Status", ok_description="version, uptime, loaded "
                                  "models, running downloads, memory and disk"),
                       tags=["modeld"], model=False),
        },
        "/storage/prune": {
            "post": _op("modeld_prune", "Remove the files no model owns",
                        _responses(200, "Prune", 400, 413, 415, ok_description="the files "
                                   "removed (or, with dryRun, that would be)"),
                        tags=["modeld"], model=False, body=_json_body("PruneInput"),
                        body_required=False,
                        description="Partials, sidecars and pins of models that no longer "
                        "exist, temp files untouched for an hour, links. Without a body it "
                        "removes them; {\"dryRun\": true} lists them only."),
        },
        "/health": {
            "get": _op("modeld_health", "Is the daemon serving? (readiness)",
                       {"200": {"description": "serving",
                                "content": {"application/json": {"schema": ref("Health")}}},
                        "503": {"$ref": "#/components/responses/EHealth503"},
                        "403": {"$ref": "#/components/responses/E403"}},
                       tags=["modeld"], model=False,
                       description="Needs no token, even when [server] token_file is set: it "
                       "reveals nothing but this status. The Host and Origin checks apply."),
        },
        "/": {
            "get": _op("modeld_page", "The status page (HTML)",
                       {"200": {"description": "the page; it holds no data, so it needs no token",
                                "content": {"text/html": {"schema": {"type": "string"}}}},
                        "403": {"$ref": "#/components/responses/E403"}},
                       tags=["modeld"], model=False),
        },
        "/static/{name}": {
            "get": {**_op("modeld_page_asset", "The status page's script and style",
                          {"200": {"description": "the file",
                                   "content": {"text/javascript": {"schema": {"type": "string"}},
                                               "text/css": {"schema": {"type": "string"}}}},
                           "403": {"$ref": "#/components/responses/E403"},
                           "404": {"$ref": "#/components/responses/E404"}},
                          tags=["modeld"], model=False),
                    "parameters": [{"name": "name", "in": "path", "required": True,
                                    "schema": {"type": "string",
                                               "enum": ["page.js", "page.css"]}}]},
        },
        "/openapi.json": {
            "get": _op("modeld_openapi", "This document",
                       {"200": {"description": "the OpenAPI document",
                                "content": {"application/json": {"schema": {"type": "object"}}}},
                        **{str(s): {"$ref": f"#/components/responses/E{s}"} for s in (401, 403)}},
                       tags=["modeld"], model=False),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "modeld",
            "version": API_VERSION,
            "summary": "A local model-supervisor daemon behind the Pieces OS Model API",
            "description": "The Pieces OS Model API (and the parts of its Models API that go "
            "with it), so the official pieces-os-client SDK works unchanged, plus modeld's own "
            "extras. Every error is JSON: {\"error\": code, \"message\": sentence}. Requests "
            "must name a loopback Host (or one in [server] allowed_hosts) and carry no foreign "
            "Origin; a mutating request's body must be application/json (the file upload: "
            "application/octet-stream).",
        },
        "servers": [{"url": "http://127.0.0.1:1000"}],
        "security": [{}, {"bearer": []}],
        "tags": [{"name": "Model"}, {"name": "Models"}, {"name": "OpenAI"}, {"name": "modeld"}],
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "parameters": {
                "model": {
                    "name": "model",
                    "in": "path",
                    "required": True,
                    "description": "a model id: 1-128 characters from A-Z a-z 0-9 . _ - "
                    "starting with a letter or digit, without '..' (else 400)",
                    "schema": {"type": "string", "pattern": f"^{ID_PATTERN.pattern}$"},
                },
            },
            "responses": {
                f"E{status}": {
                    "description": why,
                    "content": {"application/json": {"schema": ref("Error")}},
                }
                for status, why in ERRORS.items()
            } | {
                "EHealth503": {
                    "description": "starting or stopping",
                    "content": {"application/json": {"schema": ref("Health")}},
                },
            } | {
                f"EOpenAI{status}": {
                    "description": f"OpenAI's error shape (HTTP {status})",
                    "content": {"application/json": {"schema": ref("OpenAIError")}},
                }
                for status in OPENAI_ERRORS
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "required on every request when [server] token_file is set",
                },
            },
        },
    }


DOCUMENT_TEXT = json.dumps(build_document(), indent=2) + "\n"


def register_openapi(app: QuartTrio) -> None:
    @app.get("/openapi.json")
    async def openapi_document() -> Response:
        return Response(DOCUMENT_TEXT, content_type="application/json")


if __name__ == "__main__":
    sys.stdout.write(DOCUMENT_TEXT)
