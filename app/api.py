"""POST /asr: upload -> decode -> queue -> engine -> format.

``transcribe_audio`` is the shared pipeline (decode -> queue -> engine); ``app.openai_api`` serves
OpenAI's audio endpoints through the same function and the same parameter checks.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import TimeoutError as FutureTimeout

from flask import Blueprint, Response, current_app, g, request

from app import formats, metrics
from app.audio import decode_audio
from app.engines.base import DecodeOptions, Transcript
from app.errors import ApiError
from app.instance import ModelInstance
from app.queue import JobFuture, QueueFull, result_within

bp = Blueprint("api", __name__)

# Field names clients already use: the common blog recipe, whisper-asr-webservice, OpenAI-style.
UPLOAD_FIELDS = ("audio", "audio_file", "file")
TASKS = ("transcribe", "translate")

ASR_PARAMS = ("task", "language", "output", "beam_size", "temperature")
# whisper-asr-webservice parameters this service does not implement yet. The value that matches what
# the service does anyway is accepted (encode=true: uploads are always decoded with FFmpeg); any other
# value is refused rather than silently ignored.
ASR_NOT_YET = {"initial_prompt": "", "word_timestamps": "false", "vad_filter": "false",
               "encode": "true", "diarize": "false"}


class ParamError(ApiError):
    """A bad request parameter: 422 ``invalid_parameter``, with the parameter's name."""

    def __init__(self, param: str | None, message: str, status: int = 422):
        super().__init__(status, "invalid_parameter", f"{param}: {message}" if param else message)
        self.param = param


def instance() -> ModelInstance:
    return current_app.extensions["asr_instance"]


@bp.post("/asr")
def asr():
    inst = instance()
    with inst.track_request():
        return _asr(inst)


def _asr(inst: ModelInstance):
    check_names(ASR_PARAMS, ASR_NOT_YET, ignore=UPLOAD_FIELDS)
    output = choice("output", formats.OUTPUTS, "json")
    task = choice("task", TASKS, "transcribe")
    beam_size = integer("beam_size", 1, 10, inst.settings.beam_size)
    temperature = number("temperature", 0.0, 1.0, 0.0)
    data = read_upload()
    require_ready(inst)
    options = DecodeOptions(language=language(inst, param("language", inst.settings.language)),
                            task=checked_task(inst, task, "task"), beam_size=beam_size, temperature=temperature)
    transcript, future = transcribe_audio(inst, data, options)
    response = formats.render(transcript, output, {
        "model": inst.model_name,
        "engine": inst.settings.engine,
        "instance": inst.id,
        "device": inst.device,
        "processing_time": round(time.monotonic() - g.request_started, 4),
        "request_id": g.request_id,
    })
    add_server_timing(response, future)
    return response


# The shared pipeline ---------------------------------------------------------------------------

def transcribe_audio(inst: ModelInstance, data: bytes, options: DecodeOptions) -> tuple[Transcript, JobFuture]:
    """Decode the upload, queue it for the model and wait for its transcript.

    Callers have already called ``require_ready``: validating the language needs the loaded engine.
    """
    audio = decode_audio(data, inst.settings.max_audio_seconds)
    g.audio_seconds = round(audio.duration, 3)
    try:
        future = inst.queue.submit(audio.samples, options)
    except QueueFull as e:
        raise unavailable("overloaded", f"instance is busy: {e}", inst) from None
    try:
        transcript = result_within(future, inst.settings.request_timeout_seconds)
    except FutureTimeout:
        raise ApiError(504, "inference_timeout", "transcription did not finish in time") from None
    except ValueError as e:  # an option the engine cannot honour (checked above where we can)
        raise ParamError(None, f"the engine refused the decoding options: {e}") from None
    metrics.count_audio(current_app, transcript.duration)
    return transcript, future


def add_server_timing(response: Response, future: JobFuture) -> None:
    # Where the time went (standard Server-Timing, milliseconds): waiting for the model, and the model.
    response.headers["Server-Timing"] = (f"queue;dur={future.queue_seconds * 1000:.2f}, "
                                         f"inference;dur={future.inference_seconds * 1000:.2f}")


def read_upload(fields: tuple[str, ...] = UPLOAD_FIELDS, raw_body: bool = True) -> bytes:
    """The audio bytes from a multipart field or a raw ``audio/*`` body. Filenames are never used."""
    if request.mimetype == "multipart/form-data":
        parts = [f for name in fields for f in request.files.getlist(name)]
        if not parts:
            raise ApiError(400, "missing_audio",
                           f"no audio file: send it in a multipart field named {', '.join(fields)}")
        if len(parts) > 1:
            raise ApiError(400, "multiple_files", "send exactly one audio file per request")
        return parts[0].read()
    if raw_body and (request.mimetype.startswith("audio/") or request.mimetype == "application/octet-stream"):
        return request.get_data(cache=False)
    if not request.content_length:
        raise ApiError(400, "missing_audio", f"no audio: send multipart field {fields[0]!r}"
                       + (" or an audio/* body" if raw_body else ""))
    raise ApiError(415, "unsupported_media_type",
                   f"Content-Type {request.mimetype or 'none'} is not multipart/form-data"
                   + (" or audio/*" if raw_body else ""))


# Parameters -------------------------------------------------------------------------------------

def param(name: str, default: str = "") -> str:
    """A form field, else a query parameter, else ``default``; stripped."""
    value = request.form.get(name)
    if value is None:
        value = request.args.get(name)
    return (default if value is None else value).strip()


def given(name: str) -> bool:
    return name in request.form or name in request.args


def check_names(known: tuple[str, ...], not_yet: dict[str, str], ignore: tuple[str, ...] = ()) -> None:
    """Refuse unknown parameters, and recognised ones this service does not implement yet."""
    for name in list(request.args) + list(request.form):
        if name in known or name in ignore:
            continue
        if name in not_yet:
            if param(name).lower() != not_yet[name]:
                raise ParamError(name, "not supported yet by this service")
            continue
        raise ParamError(name, f"unknown parameter (accepted: {', '.join(known)})")


def choice(name: str, allowed: tuple[str, ...], default: str) -> str:
    value = param(name, default).lower() or default
    if value not in allowed:
        raise ParamError(name, f"must be one of {', '.join(allowed)}, not {value[:40]!r}")
    return value


def integer(name: str, low: int, high: int, default: int) -> int:
    raw = param(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ParamError(name, f"must be an integer from {low} to {high}, not {raw[:40]!r}") from None
    if not low <= value <= high:
        raise ParamError(name, f"must be from {low} to {high}, not {value}")
    return value


def number(name: str, low: float, high: float, default: float) -> float:
    raw = param(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise ParamError(name, f"must be a number from {low:g} to {high:g}, not {raw[:40]!r}")
    return value


def language(inst: ModelInstance, value: str, name: str = "language") -> str | None:
    value = value.strip().lower() or None
    if value and value not in inst.engine.languages:
        if not inst.engine.multilingual:
            message = "the model transcribes English only"
        else:
            message = f"{value[:40]!r} is not a language the model knows"
        raise ParamError(name, message)
    return value


def checked_task(inst: ModelInstance, task: str, name: str) -> str:
    if task == "translate" and not inst.engine.multilingual:
        raise ParamError(name, "translate needs a multilingual model; this one is English only")
    return task


def require_ready(inst: ModelInstance) -> None:
    if inst.engine is None or inst.state not in ("ready", "draining"):
        raise unavailable("not_ready", f"instance is {inst.state}", inst)


def unavailable(code: str, message: str, inst: ModelInstance) -> ApiError:
    return ApiError(503, code, message, {"Retry-After": str(inst.settings.retry_after_seconds)})
