"""``GET /v1/models`` and ``/v1/models/{model_id}``: the model this instance serves, in OpenAI's shape.

OpenAI clients and UIs list the models first and then name one; the name listed is the one
``/v1/realtime`` sessions must use (the display name: never a local path).
"""
from __future__ import annotations

from flask import Blueprint, jsonify

from app.errors import ApiError
from app.routes.asr import instance
from app.routes.openapi import Operation, register

bp = Blueprint("models", __name__, url_prefix="/v1/models")

_MODEL = {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
    "id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
    "created": {"type": "integer", "description": "when this instance started (Unix time)"},
    "owned_by": {"type": "string"}}}
register(
    Operation("get", "/v1/models", "The model this instance serves, as OpenAI lists models", "openai",
              ok={"application/json": {"type": "object", "properties": {
                  "object": {"type": "string", "enum": ["list"]}, "data": {"type": "array", "items": _MODEL}}}}),
    Operation("get", "/v1/models/{model_id}", "One model, by the id /v1/models lists", "openai",
              errors=("404",), ok={"application/json": _MODEL}),
)


def served_model() -> dict:
    inst = instance()
    return {"id": inst.model_name, "object": "model", "created": int(inst.started_at), "owned_by": "asr-service"}


@bp.get("")
def list_models():
    return jsonify(object="list", data=[served_model()])


@bp.get("/<path:model_id>")
def get_model(model_id: str):
    model = served_model()
    if model_id != model["id"]:
        raise ApiError(404, "model_not_found", f"this server serves {model['id']!r} only")
    return jsonify(model)
