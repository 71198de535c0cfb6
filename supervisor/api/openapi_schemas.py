"""The schemas of modeld's OpenAPI document (supervisor/api/openapi.py): the Pieces Model API
shapes with modeld's extras, built from the same sets the daemon validates with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from actors.spec import ID_PATTERN, MODEL_TYPES, RUNTIME_TYPES, SCORE_COUNTERS
from actors.state import State
from supervisor.enums import FOUNDATIONS, USAGES

PROGRESS_STATUSES = [
    "INITIALIZED", "IN-PROGRESS", "COMPLETED", "FAILED", "CANCELED", "RESET", "UNKNOWN",
]

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Schema], required: Sequence[str] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties,
                      "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    schema.update(extra)
    return schema


NON_NEGATIVE_INT: Schema = {"type": "integer", "minimum": 0}
SIZE: Schema = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
ANY: Schema = {"description": "accepted for compatibility with the Pieces SDK and ignored"}


def schemas() -> dict[str, Schema]:
    model_types = sorted(MODEL_TYPES)
    usages = sorted(USAGES)
    foundations = sorted(FOUNDATIONS)
    states = [s.value for s in State]
    readable = {"type": "string", "description": "e.g. \"1.2 GB\" (powers of 1000)"}
    model_props: dict[str, Schema] = {
        "id": {"type": "string", "pattern": f"^{ID_PATTERN.pattern}$"},
        "name": {"type": "string"},
        "version": {"type": "string"},
        "cloud": {"type": "boolean", "const": False},
        "created": ref("GroupedTimestamp"),
        "type": {"type": "string", "enum": model_types},
        "usage": {"type": "string", "enum": usages},
        "downloaded": {"type": "boolean"},
        "downloading": {"type": "boolean"},
        "loaded": {"type": "boolean"},
        "custom": {"type": "boolean", "description": "registered through /models/create"},
        "cpu": {"type": "boolean", "const": True},
        "state": {"type": "string", "enum": states,
                  "description": "modeld: the actor state, transient ones included"},
        "partialBytes": {**NON_NEGATIVE_INT,
                         "description": "modeld: bytes of a partial download kept on disk"},
        "modelType": {"type": "string", "enum": sorted(RUNTIME_TYPES),
                      "description": "modeld: the ctransformers model type"},
        "bytes": ref("ByteDescriptor"),
        "ram": ref("ByteDescriptor"),
        "foundation": {"type": "string", "enum": foundations},
        "quantization": {"type": "string"},
        "description": {"type": "string"},
        "maxTokens": ref("ModelMaxTokens"),
        "parameters": {"type": "number", "minimum": 0,
                       "description": "billions of parameters, from the GGUF header"},
        "url": {"type": "string", "description": "modeld: where the file is downloaded from"},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "error": {"type": "string", "description": "modeld: why the last operation failed"},
        "loadSeconds": {"type": "number", "minimum": 0},
        "unique": {"type": "string"},
        "score": ref("Score"),
        "pid": {"type": "integer", "minimum": 1,
                "description": "modeld: the worker process of a loaded model"},
        "residentBytes": {**SIZE, "description": "modeld: that worker's resident memory now"},
        "evicted": {"type": "array", "items": {"type": "string"},
                    "description": "modeld, in a load's answer: the models unloaded to make "
                    "room ([runtime] max_loaded)"},
        "runtime": {"type": "string", "enum": ["llama.cpp", "ctransformers"],
                    "description": "modeld: the runtime that runs it (or would)"},
        "architecture": {"type": "string", "description": "modeld: from the GGUF header"},
        "parallel": {"type": "integer", "minimum": 1,
                     "description": "modeld: requests served at once (llama.cpp)"},
        "source": {"type": "string",
                   "description": "modeld: the Hugging Face reference it comes from (hf.co/...)"},
        "revision": {"type": "string", "pattern": "^[0-9a-f]{40}$",
                     "description": "modeld: the Hub commit the source is pinned to"},
        "file": {"type": "string", "description": "modeld: the file of that commit"},
        "parts": {"type": "array", "items": {"type": "string"},
                  "description": "modeld: a split GGUF set's files of that commit, in order "
                  "(`file` is the first)"},
        "keepAlive": {"type": "string", "description": "modeld: how long it stays loaded "
                      "when idle after a load on first use (\"15m\", \"0\", \"-1\")"},
        "expiresAt": {"type": "string", "format": "date-time",
                      "description": "modeld: when it is unloaded if it stays idle"},
        "memoryEstimate": {"type": "integer", "minimum": 0,
                           "description": "modeld: bytes it takes loaded (weights, KV cache, "
                           "compute buffers, its worker), estimated from its GGUF header"},
        "updateAvailable": {"type": "boolean",
                            "description": "modeld: the source's reference now names another "
                            "file than the pinned one (checked in the background, [hub] "
                            "update_check); absent until checked"},
        "update": {"type": "string", "enum": ["up to date", "updating", "downloading"],
                   "description": "modeld, in the answer of a download with update: true: "
                   "nothing to download; a newer file is downloading beside the old one; "
                   "the model had no file, so the newest is downloading"},
    }
    model_required = [
        "id", "name", "version", "cloud", "created", "type", "usage", "downloaded",
        "downloading", "loaded", "custom", "cpu", "state", "partialBytes", "modelType",
    ]

    # What create and update read: the Pieces Model keys (read-only ones ignored) plus the
    # modeld extras that may be set; unknown keys are refused with 400.
    body_props: dict[str, Schema] = {
        "name": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": "\\S"},
        "version": {"type": "string", "maxLength": 4096},
        "cloud": {"type": "boolean", "const": False},
        "created": ref("GroupedTimestampInput"),
        "type": {"type": "string", "enum": model_types},
        "usage": {"type": "string", "enum": usages},
        "foundation": {"type": "string", "enum": foundations},
        "description": {"type": "string", "maxLength": 4096},
        "quantization": {"type": "string", "maxLength": 4096},
        "cpu": {"type": "boolean"},
        "custom": {"type": "boolean"},
        "denied": {"type": "boolean"},
        "downloaded": {"type": "boolean"},
        "downloading": {"type": "boolean"},
        "loaded": {"type": "boolean"},
        "bytes": ref("ByteDescriptorInput"),
        "ram": ref("ByteDescriptorInput"),
        "maxTokens": ref("ModelMaxTokensInput"),
        "parameters": {"type": "number"},
        "capabilities": ANY,
        "organization": ANY,
        "provider": ANY,
        "schema": ANY,
        "score": ANY,
        "unique": ANY,
        "url": {
            "type": "string",
            "maxLength": 4096,
            "pattern": "^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$",
            "description": "https; http only with [download] allow_http; no credentials",
        },
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "modelType": {"type": "string", "enum": sorted(RUNTIME_TYPES)},
        "runtime": {"type": "string", "enum": ["auto", "llama.cpp", "ctransformers"]},
        "parallel": {"type": "integer", "minimum": 1, "maximum": 64},
        "architecture": ANY,
        "keepAlive": {"type": "string", "maxLength": 64,
                      "description": "a duration: \"15m\", \"30s\", \"0\" (unload when "
                      "idle), \"-1\" (keep until unloaded); else 400"},
        "expiresAt": ANY,
        "memoryEstimate": ANY,
        "state": ANY,
        "error": ANY,
        "partialBytes": ANY,
        "loadSeconds": ANY,
        "source": {"type": "string", "maxLength": 2048,
                   "description": "modeld, on create, instead of url: a Hub reference "
                   "(hf.co/USER/REPO[:QUANT][@REVISION], hf.co/USER/REPO/FILE.gguf, or a "
                   "huggingface.co blob/resolve URL), resolved and pinned before the model "
                   "is recorded; ignored on update"},
        "revision": ANY,
        "file": ANY,
        "parts": ANY,
    }
    update_props = {"id": {"type": "string", "pattern": f"^{ID_PATTERN.pattern}$"},
                    **body_props}
    nullable_number = {"type": ["number", "null"]}

    return {
        "Status": _obj({
            "version": {"type": "string"},
            "uptimeSeconds": {"type": "number", "minimum": 0},
            "models": NON_NEGATIVE_INT,
            "loaded": {"type": "array", "items": _obj({
                "id": {"type": "string"},
                "state": {"type": "string", "enum": ["loading", "loaded", "unloading"]},
                "runtime": {"type": ["string", "null"]},
                "pid": {"type": ["integer", "null"]},
                "rssBytes": {"type": ["integer", "null"], "minimum": 0},
                "contextLength": {"type": ["integer", "null"]},
                "slots": {"type": "integer", "minimum": 1},
                "slotsBusy": NON_NEGATIVE_INT,
                "idleSince": {"type": ["string", "null"], "format": "date-time"},
                "keepAliveSeconds": {"type": ["number", "null"],
                                     "description": "null: kept until unloaded"},
                "expiresAt": {"type": ["string", "null"], "format": "date-time"},
            }, ["id", "state", "pid", "rssBytes", "contextLength", "slotsBusy", "expiresAt"])},
            "downloads": {"type": "array", "items": _obj({
                "id": {"type": "string"},
                "status": {"type": "string", "enum": PROGRESS_STATUSES},
                "bytes": NON_NEGATIVE_INT,
                "total": {"type": ["integer", "null"], "minimum": 0},
                "percentage": {"type": "number", "minimum": 0, "maximum": 100},
                "rate": {"type": ["number", "null"], "description": "bytes per second"},
                "eta": {"type": ["number", "null"], "description": "seconds"},
                "retrying": {"type": ["string", "null"]},
            }, ["id", "bytes", "total", "rate", "eta"])},
            "storage": _obj({"dir": {"type": "string"}, "usedBytes": SIZE,
                             "freeBytes": SIZE, "totalBytes": SIZE},
                            ["usedBytes", "freeBytes"]),
            "memory": _obj({"availableBytes": SIZE, "totalBytes": SIZE}, ["availableBytes"]),
        }, ["version", "uptimeSeconds", "loaded", "downloads", "storage", "memory"]),
        "LoadOptions": {"type": "object", "properties": {"keepAlive": {
            "type": ["string", "number"], "maxLength": 64,
            "description": "modeld: how long the model stays loaded when idle (\"5m\"; "
            "\"-1\": until unloaded, the default of an explicit load)"}},
            "description": "optional; other keys are ignored"},
        "DownloadOptions": {"type": "object", "properties": {"update": {
            "type": "boolean",
            "description": "modeld: re-resolve the model's Hub source first; a newer file is "
            "downloaded beside the old one (which stays loadable) and published when "
            "verified"}},
            "description": "optional; other keys are ignored"},
        "PruneInput": _obj({"dryRun": {"type": "boolean", "description": "list only"}}),
        "Prune": _obj({
            "dryRun": {"type": "boolean"},
            "files": {"type": "array", "items": _obj({
                "path": {"type": "string"}, "bytes": SIZE, "reason": {"type": "string"},
            }, ["path", "bytes", "reason"])},
            "bytes": SIZE,
        }, ["dryRun", "files", "bytes"]),
        "Health": _obj({"status": {"type": "string", "enum": ["ok", "starting", "stopping"]}},
                       ["status"]),
        "Error": _obj(
            {
                "error": {"type": "string", "description": "machine-readable code"},
                "message": {"type": "string", "description": "a sentence a person can act on"},
            },
            ["error", "message"],
        ),
        "OpenAIError": _obj(
            {"error": _obj({"message": {"type": "string"}, "type": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                            "code": {"type": ["string", "null"]}},
                           ["message", "type", "param", "code"])},
            ["error"],
        ),
        "GroupedTimestamp": _obj({"value": {"type": "string", "format": "date-time"}},
                                 ["value"]),
        "ByteDescriptor": _obj({"value": SIZE, "readable": readable}, ["value", "readable"]),
        "ModelMaxTokens": _obj(
            {"total": NON_NEGATIVE_INT, "input": NON_NEGATIVE_INT, "output": NON_NEGATIVE_INT},
            ["total"],
        ),
        "Model": _obj(model_props, model_required,
                      description="a model as modeld reports it (Pieces Model + modeld extras)"),
        "Score": _obj({name: NON_NEGATIVE_INT for name in ("manual", "automatic",
                                                             *SCORE_COUNTERS)},
                      ["manual", "automatic"],
                      description="how often clients used the model (POST .../scores/"
                      "increment); durable for custom models, in memory for catalog ones"),
        "SeededScoreIncrement": _obj(
            {"model": _obj({name: {"type": "boolean"} for name in SCORE_COUNTERS},
                           description="each true counter goes up by one"),
             "schema": ANY},
            description="the Pieces SDK's increment; modeld counts its `model` part and "
            "ignores the others (asset, conversation, ...)", additionalProperties=True),
        "ModelDeleteCacheInput": _obj({"schema": ANY}),
        "ModelDeleteCacheOutput": _obj(
            {"model": _obj({"id": {"type": "string"}}, ["id"]), "schema": ANY}, ["model"]),
        "Models": _obj({"iterable": {"type": "array", "items": ref("Model")}}, ["iterable"]),
        "ModelDownloadProgress": _obj(
            {
                "status": {"type": "string", "enum": PROGRESS_STATUSES},
                "percentage": {"type": "number", "minimum": 0, "maximum": 100},
                "model": {"type": "string"},
                "bytes": NON_NEGATIVE_INT,
                "total": NON_NEGATIVE_INT,
                "bytesPerSecond": {"type": "number", "minimum": 0},
                "etaSeconds": {"type": "number", "minimum": 0},
                "error": {"type": "string"},
                "retrying": {"type": "string", "description": "modeld: while a failed "
                             "connection waits to be retried, e.g. \"retrying (2/6): "
                             "connection refused\""},
                "queuePosition": {"type": "integer", "minimum": 1, "description": "modeld: "
                                  "with INITIALIZED, its place in line while [download] "
                                  "max_active downloads run (1: next)"},
                "connections": {"type": "integer", "minimum": 0, "description": "modeld: "
                                "with IN-PROGRESS, the connections moving its bytes now (up "
                                "to [download] connections)"},
            },
            ["status", "percentage", "model", "bytes"],
        ),
        "GroupedTimestampInput": _obj(
            {"value": {"type": ["string", "null"]}, "readable": {"type": ["string", "null"]},
             "schema": ANY},
        ),
        "ByteDescriptorInput": _obj(
            {"value": {"type": ["integer", "null"], "minimum": 0, "maximum": 2**63 - 1},
             "readable": {"type": ["string", "null"]}, "schema": ANY},
        ),
        "ModelMaxTokensInput": _obj(
            {"total": nullable_number, "input": nullable_number, "output": nullable_number,
             "schema": ANY},
        ),
        "SeededModel": _obj(body_props, ["name"],
                            description="a new custom model: a Model without id"),
        "ModelUpdate": _obj(update_props, ["id"],
                            description="a Model as the SDK sends it; only custom models"),
    }
