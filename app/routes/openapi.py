"""The OpenAPI 3 document served at ``/openapi.json``, built from the routes' own parameter definitions.

Each documented route is an ``Operation``: its parameters are the very ``app.routes.params.Params`` the route
parses with, so validation and documentation cannot drift. A module that adds routes adds its
operations with ``register`` (at import), and they appear in the document; a path written
``/v1/jobs/{job_id}`` gets its path parameter.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from app.config import Settings
from app.routes.params import Params

OPENAPI_VERSION = "3.0.3"

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "message"],
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}
_OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": "string", "nullable": True}, "code": {"type": "string"}}}}}
_SEGMENT = {"type": "object", "properties": {
    "id": {"type": "integer"}, "start": {"type": "number"}, "end": {"type": "number"}, "text": {"type": "string"},
    "words": {"type": "array", "items": {"type": "object", "properties": {
        "start": {"type": "number"}, "end": {"type": "number"}, "word": {"type": "string"},
        "probability": {"type": "number", "nullable": True}}}}}}
_TRANSCRIPT = {"type": "object", "required": ["text", "segments"], "properties": {
    "text": {"type": "string"}, "language": {"type": "string"}, "language_probability": {"type": "number"},
    "duration": {"type": "number", "description": "seconds of audio"},
    "segments": {"type": "array", "items": {"$ref": "#/components/schemas/Segment"}},
    "model": {"type": "string"}, "engine": {"type": "string"}, "instance": {"type": "string"},
    "device": {"type": "string"}, "processing_time": {"type": "number"}, "request_id": {"type": "string"}}}
SCHEMAS = {"Error": _ERROR, "OpenAIError": _OPENAI_ERROR, "Segment": _SEGMENT, "Transcript": _TRANSCRIPT}

# Statuses every upload route may answer, with the error codes of docs/api.md's table.
_ERROR_STATUSES = {
    "400": "missing_audio, empty_audio, multiple_files",
    "413": "audio_too_long, payload_too_large",
    "415": "unsupported_media_type: not audio",
    "422": "invalid_parameter (the message starts with the parameter's name), undecodable_audio, "
           "audio_too_short, invalid_samples, unsupported_sample_rate, unsupported_channels, no_speech",
    "503": "overloaded, not_ready, no_instance_available, jobs_full; with Retry-After",
    "403": "listing_needs_api_keys: jobs are listed per API key, and this server has none",
    "404": "job_not_found (unknown, another API key's, or removed job_retention_seconds after it finished), "
           "model_not_found (not the model this server serves)",
    "409": "job_not_finished (with Retry-After), job_failed, job_cancelled",
}


@dataclass(frozen=True)
class Operation:
    """One documented route.

    ``upload``: the multipart field the audio goes in (None: no body); ``raw_body``: an ``audio/*``
    body is accepted as well, with the parameters in the query string. ``params_in``: where the
    parameters are documented (``query`` for /asr, as whisper-asr-webservice does, ``form`` for
    OpenAI's multipart fields). ``ok``: the success answer's media types, each a schema.
    """

    method: str
    path: str
    summary: str
    tag: str
    description: str = ""
    params: Params | None = None
    params_in: str = "query"
    upload: str | None = None
    raw_body: bool = False
    ok: dict[str, dict] = field(default_factory=lambda: {"application/json": {"type": "object"}})
    errors: tuple[str, ...] = ()
    error_schema: str = "Error"
    public: bool = False  # no API key needed, where keys are on (nginx lets probes through)
    ok_status: str = "200"  # the success status (202 for a job accepted to run later)

    def document(self, settings: Settings) -> dict:
        op: dict = {"summary": self.summary, "tags": [self.tag],
                    "operationId": self.method + re.sub(r"\W+", "_", self.path).rstrip("_").lower()}
        if self.description:
            op["description"] = self.description
        if self.public:
            op["security"] = []
        params = self.params.params if self.params else ()
        # Flask's <name> segments, written {name} in ``path``: required path parameters.
        parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                      for name in re.findall(r"\{(\w+)\}", self.path)]
        if self.params_in == "query":
            parameters += [{"name": p.name, "in": "query", "required": False, "description": p.description,
                            "schema": p.schema(settings)} for p in params]
        if parameters:
            op["parameters"] = parameters
        if self.upload:
            properties = {self.upload: {"type": "string", "format": "binary", "description": "the audio file"}}
            if self.params_in == "form":
                properties.update({p.name: {**p.schema(settings), "description": p.description} for p in params})
            content = {"multipart/form-data": {"schema": {"type": "object", "required": [self.upload],
                                                          "properties": properties}}}
            if self.raw_body:
                content["audio/*"] = {"schema": {"type": "string", "format": "binary"}}
            op["requestBody"] = {"required": True, "content": content}
        ok = {"description": _OK_DESCRIPTIONS.get(self.ok_status, "OK")}
        if self.ok:
            ok["content"] = {media: {"schema": schema} for media, schema in self.ok.items()}
        op["responses"] = {self.ok_status: ok}
        for status in self.errors:
            op["responses"][status] = {"description": _ERROR_STATUSES[status], "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{self.error_schema}"}}}}
        return op


_OK_DESCRIPTIONS = {"202": "Accepted", "101": "Switching Protocols: the WebSocket is open"}

OPERATIONS: list[Operation] = []


def register(*operations: Operation) -> None:
    OPERATIONS.extend(operations)


def document(settings: Settings, version: str) -> dict:
    """The whole OpenAPI document for this instance's settings (defaults come from them)."""
    paths: dict[str, dict] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = op.document(settings)
    doc = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "asr-service", "version": version, "description": (
            "Speech recognition with Whisper models: upload audio, get a transcript. Errors are JSON; "
            "a bad parameter is 422 `invalid_parameter`, overload a 503 with Retry-After.")},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }
    if settings.api_keys_file:  # nginx checks the keys; the document tells clients (and Swagger UI) how
        doc["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"apiKey": []}]
    return doc
