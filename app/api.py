"""POST /asr: upload -> decode -> queue -> engine -> format."""
from __future__ import annotations

import time
from concurrent.futures import TimeoutError as FutureTimeout

from flask import Blueprint, current_app, g, request

from app import formats, metrics
from app.audio import decode_audio
from app.engines.base import DecodeOptions
from app.errors import ApiError
from app.instance import ModelInstance
from app.queue import QueueFull, result_within

bp = Blueprint("api", __name__)

# Field names clients already use: the common blog recipe, whisper-asr-webservice, OpenAI-style.
UPLOAD_FIELDS = ("audio", "audio_file", "file")


def instance() -> ModelInstance:
    return current_app.extensions["asr_instance"]


@bp.post("/asr")
def asr():
    inst = instance()
    with inst.track_request():
        return _transcribe(inst)


def _transcribe(inst: ModelInstance):
    started = time.monotonic()
    output = _param("output", "json")
    if output not in formats.OUTPUTS:
        raise ApiError(422, "invalid_parameter", f"output must be one of {', '.join(formats.OUTPUTS)}")
    data = read_upload()
    _require_ready(inst)
    language = _language(inst)
    audio = decode_audio(data, inst.settings.max_audio_seconds)
    g.audio_seconds = round(audio.duration, 3)
    options = DecodeOptions(language=language, beam_size=inst.settings.beam_size)
    try:
        future = inst.queue.submit(audio.samples, options)
    except QueueFull as e:
        raise _unavailable("overloaded", f"instance is busy: {e}", inst) from None
    try:
        transcript = result_within(future, inst.settings.request_timeout_seconds)
    except FutureTimeout:
        raise ApiError(504, "inference_timeout", "transcription did not finish in time") from None
    metrics.count_audio(current_app, transcript.duration)
    response = formats.render(transcript, output, {
        "model": inst.model_name,
        "engine": inst.settings.engine,
        "instance": inst.id,
        "device": inst.device,
        "processing_time": round(time.monotonic() - started, 4),
        "request_id": g.request_id,
    })
    # Where the time went (standard Server-Timing, milliseconds): waiting for the model, and the model.
    response.headers["Server-Timing"] = (f"queue;dur={future.queue_seconds * 1000:.2f}, "
                                         f"inference;dur={future.inference_seconds * 1000:.2f}")
    return response


def read_upload() -> bytes:
    """The audio bytes from a multipart field or a raw ``audio/*`` body. Filenames are never used."""
    if request.mimetype == "multipart/form-data":
        parts = [f for name in UPLOAD_FIELDS for f in request.files.getlist(name)]
        if not parts:
            raise ApiError(400, "missing_audio",
                           f"no audio file: send it in a multipart field named {', '.join(UPLOAD_FIELDS)}")
        if len(parts) > 1:
            raise ApiError(400, "multiple_files", "send exactly one audio file per request")
        return parts[0].read()
    if request.mimetype.startswith("audio/") or request.mimetype == "application/octet-stream":
        return request.get_data(cache=False)
    if not request.content_length:
        raise ApiError(400, "missing_audio", "no audio: send multipart field 'audio' or an audio/* body")
    raise ApiError(415, "unsupported_media_type",
                   f"Content-Type {request.mimetype or 'none'} is not multipart/form-data or audio/*")


def _param(name: str, default: str) -> str:
    return (request.form.get(name) or request.args.get(name) or default).strip()


def _language(inst: ModelInstance) -> str | None:
    language = _param("language", inst.settings.language).lower() or None
    if language and language not in inst.engine.languages:
        if not inst.engine.multilingual:
            message = f"model {inst.model_name} transcribes English only"
        else:
            message = f"language {language!r} is not one the model knows"
        raise ApiError(422, "invalid_parameter", f"language: {message}")
    return language


def _require_ready(inst: ModelInstance) -> None:
    if inst.engine is None or inst.state not in ("ready", "draining"):
        raise _unavailable("not_ready", f"instance is {inst.state}", inst)


def _unavailable(code: str, message: str, inst: ModelInstance) -> ApiError:
    return ApiError(503, code, message, {"Retry-After": str(inst.settings.retry_after_seconds)})
