"""OpenAI-compatible audio endpoints: ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``.

Same pipeline as /asr (``asr.transcribe_audio``), OpenAI's request fields and response formats, and
errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with this service's
status codes (400, 413, 415, 422, 503...). ``model`` may be any name: an instance serves one model,
and its configured name (possibly a path) is never echoed.
"""
from __future__ import annotations

import math

from flask import Blueprint, Response, g, jsonify
from werkzeug.exceptions import HTTPException

from app.routes import asr
from app import formats
from app.engines.base import DecodeOptions, Transcript
from app.errors import ApiError
from app.routes.openapi import Operation, register
from app.routes.params import TEMPERATURE, Param, Params

bp = Blueprint("openai", __name__, url_prefix="/v1/audio")

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = "timestamp_granularities[]"
# OpenAI fields not implemented; the value that asks for nothing extra is accepted.
UNSUPPORTED = {"stream": "false"}
_COMMON = (
    Param("model", "string", default="whisper-1",
          description="Any name: an instance serves the one model it was started with."),
    Param("prompt", "string", max_length=asr.MAX_PROMPT_CHARS, default="",
          description="Text for the first window to follow, as /asr's initial_prompt."),
    Param("response_format", "string", choices=RESPONSE_FORMATS, default="json",
          description="json ({text}), text, srt, vtt, or verbose_json (segments and words, OpenAI's fields)."),
    TEMPERATURE,
)
TRANSCRIPTION_PARAMS = Params(_COMMON + (
    Param("language", "string", default="",
          description="A language the model knows, as a code (en) or a name (English); auto or empty: detect."),
    Param(GRANULARITIES, "array", choices=("segment", "word"), default=(), aliases=("timestamp_granularities",),
          description="segment, word or both (default: segment); verbose_json only, as at OpenAI."),
), UNSUPPORTED, ignore=("file",))
TRANSLATION_PARAMS = Params(_COMMON, UNSUPPORTED, ignore=("file",))
_FORMAT_OUTPUT = {"text": "txt", "srt": "srt", "vtt": "vtt"}

_OK = {"application/json": {"type": "object", "properties": {"text": {"type": "string"}}},
       "text/plain": {"type": "string"}, "application/x-subrip": {"type": "string"}, "text/vtt": {"type": "string"}}
register(*(
    Operation("post", f"/v1/audio/{kind}", summary, "openai", params=params, params_in="form", upload="file",
              errors=("400", "413", "415", "422", "503"), error_schema="OpenAIError", ok=_OK,
              description="OpenAI's audio API: the same fields, response formats and error shape.")
    for kind, summary, params in (("transcriptions", "OpenAI-compatible transcription", TRANSCRIPTION_PARAMS),
                                  ("translations", "OpenAI-compatible translation to English", TRANSLATION_PARAMS))))


@bp.post("/transcriptions")
def transcriptions():
    return _serve("transcribe")


@bp.post("/translations")
def translations():
    return _serve("translate")


def _serve(task: str):
    inst = asr.instance()
    with inst.track_request():
        values = (TRANSCRIPTION_PARAMS if task == "transcribe" else TRANSLATION_PARAMS).parse(inst.settings)
        response_format, temperature = values["response_format"], values["temperature"]
        granularities = _granularities(values, response_format)
        data = asr.read_upload(fields=("file",), raw_body=False)
        asr.require_ready(inst)
        if task == "translate":
            asr.checked_task(inst, task, "model")
            language = None
        else:
            language = asr.language(inst, values["language"])
        options = DecodeOptions(language=language, task=task, beam_size=inst.settings.beam_size,
                                temperature=temperature, fallback=inst.settings.temperature_fallback,
                                condition_on_previous_text=inst.settings.condition_on_previous_text,
                                initial_prompt=values["prompt"],
                                word_timestamps=asr.checked_words(inst, "word" in granularities, GRANULARITIES))
        transcript, future = asr.transcribe_audio(inst, data, options, inst.settings.vad_filter)
        response = _render(transcript, response_format, task, temperature, granularities)
        asr.add_server_timing(response, future)
        return response


def _granularities(values: dict, response_format: str) -> set[str]:
    """The timestamp granularities asked for (default: segment); as OpenAI, only verbose_json has any."""
    asked = values.get(GRANULARITIES, ())  # translations have none: segments only
    if asked and response_format != "verbose_json":
        raise asr.ParamError(GRANULARITIES, "needs response_format verbose_json")
    return set(asked) or {"segment"}


def _render(transcript: Transcript, response_format: str, task: str, temperature: float,
            granularities: set[str]) -> Response:
    if response_format == "json":
        return jsonify(text=transcript.text, usage=_usage(transcript))
    if response_format == "verbose_json":
        body = formats.openai_verbose(transcript, task, temperature, with_segments="segment" in granularities,
                                      with_words="word" in granularities)
        return jsonify(**body, usage=_usage(transcript))
    output = _FORMAT_OUTPUT[response_format]
    return formats.text_response(formats.WRITERS[output](transcript), output)


def _usage(transcript: Transcript) -> dict:
    return {"type": "duration", "seconds": math.ceil(transcript.duration)}


# Errors in OpenAI's shape, for these routes only ---------------------------------------------------

def _openai_error(status: int, code: str, message: str, param: str | None, headers: dict | None = None):
    g.error_code = code  # for the request's log line
    kind = "server_error" if status >= 500 else "invalid_request_error"
    response = jsonify(error={"message": message, "type": kind, "param": param, "code": code})
    response.status_code = status
    response.headers.update(headers or {})
    return response


@bp.errorhandler(ApiError)
def _api_error(e: ApiError):
    param = getattr(e, "param", None)
    if param is None and e.code in ("missing_audio", "empty_audio", "multiple_files", "unsupported_media_type",
                                    "undecodable_audio", "audio_too_short", "audio_too_long", "invalid_samples",
                                    "unsupported_sample_rate", "unsupported_channels"):
        param = "file"
    return _openai_error(e.status, e.code, e.message, param, e.headers)


@bp.errorhandler(HTTPException)
def _http_error(e: HTTPException):
    code = (e.name or "error").lower().replace(" ", "_")
    return _openai_error(e.code or 500, code, e.description or e.name, None)
