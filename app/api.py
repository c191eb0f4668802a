"""POST /asr: upload -> decode -> (VAD) -> queue -> engine -> format; POST /detect-language.

``transcribe_audio`` is the shared pipeline (decode -> VAD -> queue -> engine); ``app.openai_api``
serves OpenAI's audio endpoints through the same function and the same parameter checks.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

from flask import Blueprint, Response, current_app, g, jsonify, request

from app import formats, languages, metrics, vad
from app.audio import DecodedAudio, decode_audio
from app.engines.base import DecodeOptions, Transcript
from app.errors import ApiError
from app.instance import ModelInstance
from app.queue import JobFuture, QueueFull, result_within

bp = Blueprint("api", __name__)

# Field names clients already use: the common blog recipe, whisper-asr-webservice, OpenAI-style.
UPLOAD_FIELDS = ("audio", "audio_file", "file")
TASKS = ("transcribe", "translate")

ASR_PARAMS = ("task", "language", "output", "beam_size", "temperature", "initial_prompt", "word_timestamps",
              "vad_filter")
DETECT_PARAMS = ("vad_filter",)
# whisper-asr-webservice parameters this service does not implement. The value that matches what the
# service does anyway is accepted (encode=true: uploads are always decoded with FFmpeg); any other
# value is refused rather than silently ignored.
ASR_UNSUPPORTED = {"encode": "true", "diarize": "false"}
MAX_PROMPT_CHARS = 2000  # Whisper keeps the prompt's last 223 tokens; longer text is a client mistake


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
    settings = inst.settings
    check_names(ASR_PARAMS, ASR_UNSUPPORTED, ignore=UPLOAD_FIELDS)
    output = choice("output", formats.OUTPUTS, settings.output)
    task = choice("task", TASKS, "transcribe")
    beam_size = integer("beam_size", 1, 10, settings.beam_size)
    temperature = number("temperature", 0.0, 1.0, 0.0)
    initial_prompt = prompt("initial_prompt")
    word_timestamps = boolean("word_timestamps", settings.word_timestamps)
    vad_filter = boolean("vad_filter", settings.vad_filter)
    data = read_upload()
    require_ready(inst)
    options = DecodeOptions(language=language(inst, param("language", settings.language)),
                            task=checked_task(inst, task, "task"), beam_size=beam_size, temperature=temperature,
                            initial_prompt=initial_prompt,
                            word_timestamps=checked_words(inst, word_timestamps, "word_timestamps"))
    transcript, future = transcribe_audio(inst, data, options, vad_filter)
    response = formats.render(transcript, output, {
        "model": inst.model_name,
        "engine": inst.settings.engine,
        "instance": inst.id,
        "device": inst.device,
        "processing_time": round(time.monotonic() - g.request_started, 4),
        "request_id": g.request_id,
    }, words=word_timestamps)
    add_server_timing(response, future)
    return response


@bp.post("/detect-language")
def detect_language():
    inst = instance()
    with inst.track_request():
        check_names(DETECT_PARAMS, ASR_UNSUPPORTED, ignore=UPLOAD_FIELDS)
        vad_filter = boolean("vad_filter", inst.settings.vad_filter)
        if not inst.settings.detect_language:
            raise ApiError(403, "language_detection_disabled",
                           f"language detection is off on this server: every request is {inst.settings.language!r}")
        data = read_upload()
        require_ready(inst)
        audio = decoded(inst, data)
        samples = audio.samples
        if vad_filter:
            samples = vad.keep_speech(samples).samples
            if not len(samples):
                raise ApiError(422, "no_speech", "vad_filter found no speech to detect a language in")
        # The engines look at the first 30 s only.
        (code, probability), future = queued(inst, lambda: inst.queue.submit_language_detection(samples))
        response = jsonify(language=code, confidence=None if probability is None else round(float(probability), 4),
                           # whisper-asr-webservice's names, for its clients
                           detected_language=languages.LANGUAGE_NAMES.get(code, code), language_code=code)
        add_server_timing(response, future)
        return response


# The shared pipeline ---------------------------------------------------------------------------

def transcribe_audio(inst: ModelInstance, data: bytes, options: DecodeOptions,
                     vad_filter: bool = False) -> tuple[Transcript, JobFuture | None]:
    """Decode the upload, optionally keep only its speech, queue it for the model and wait for its
    transcript; the future (None when VAD found no speech and the model was skipped) tells the timing.

    Callers have already called ``require_ready``: validating the language needs the loaded engine.
    """
    audio = decoded(inst, data)
    if not vad_filter:
        transcript, future = queued(inst, lambda: inst.queue.submit(audio.samples, options))
    else:
        speech = vad.keep_speech(audio.samples)
        if not speech.found:
            # The language of a model with only one (English-only Whisper), else "und": none was heard.
            languages = inst.engine.languages
            own = next(iter(languages)) if len(languages) == 1 else "und"
            return vad.silent(audio.duration, options.language or own), None
        transcript, future = queued(inst, lambda: inst.queue.submit(speech.samples, options))
        transcript = vad.restore_times(transcript, speech, audio.duration)
    metrics.count_audio(current_app, transcript.duration)
    return transcript, future


def decoded(inst: ModelInstance, data: bytes) -> DecodedAudio:
    audio = decode_audio(data, inst.settings.max_audio_seconds)
    g.audio_seconds = round(audio.duration, 3)
    return audio


def queued(inst: ModelInstance, submit: Callable[[], JobFuture]):
    """Run one job through the instance's queue: (its result, its future)."""
    try:
        future = submit()
    except QueueFull as e:
        raise unavailable("overloaded", f"instance is busy: {e}", inst) from None
    try:
        return result_within(future, inst.settings.request_timeout_seconds), future
    except FutureTimeout:
        raise ApiError(504, "inference_timeout", "the model did not finish in time") from None
    except ValueError as e:  # an option the engine cannot honour (checked above where we can)
        raise ParamError(None, f"the engine refused the request: {e}") from None


def add_server_timing(response: Response, future: JobFuture | None) -> None:
    # Where the time went (standard Server-Timing, milliseconds): waiting for the model, and the model.
    queue_seconds, inference_seconds = (future.queue_seconds, future.inference_seconds) if future else (0.0, 0.0)
    response.headers["Server-Timing"] = (f"queue;dur={queue_seconds * 1000:.2f}, "
                                         f"inference;dur={inference_seconds * 1000:.2f}")


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


def check_names(known: tuple[str, ...], unsupported: dict[str, str], ignore: tuple[str, ...] = ()) -> None:
    """Refuse unknown parameters, and recognised ones this service does not implement unless they
    carry the one value that asks for nothing (``unsupported``: name -> that value)."""
    for name in list(request.args) + list(request.form):
        if name in known or name in ignore:
            continue
        if name in unsupported:
            if param(name).lower() != unsupported[name]:
                raise ParamError(name, "not supported by this service")
            continue
        raise ParamError(name, f"unknown parameter (accepted: {', '.join(known)})")


def boolean(name: str, default: bool) -> bool:
    raw = param(name).lower()
    if not raw:
        return default
    if raw in ("true", "1", "yes", "on"):
        return True
    if raw in ("false", "0", "no", "off"):
        return False
    raise ParamError(name, f"must be true or false, not {raw[:40]!r}")


def prompt(name: str) -> str:
    text = param(name)
    if len(text) > MAX_PROMPT_CHARS:
        raise ParamError(name, f"must be at most {MAX_PROMPT_CHARS} characters, not {len(text)}")
    return text


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
    """The language code a request asks for (a code or a name), or None to detect ("auto", empty);
    where detection is switched off, "auto" means the server's own language."""
    code = languages.to_code(value)
    if code is None and not inst.settings.detect_language:
        value = inst.settings.language
        code = languages.to_code(value)
    if code is not None and code not in inst.engine.languages:
        if not inst.engine.multilingual:
            message = "the model transcribes English only"
        else:
            message = f"{value.strip()[:40]!r} is not a language the model knows"
        raise ParamError(name, message)
    return code


def checked_task(inst: ModelInstance, task: str, name: str) -> str:
    if task == "translate" and not inst.engine.can_translate:
        if inst.engine.multilingual:
            raise ParamError(name, f"translate is not supported by the {inst.engine.name} engine: "
                                   "the model transcribes only")
        raise ParamError(name, "translate needs a multilingual model; this one is English only")
    return task


def checked_words(inst: ModelInstance, wanted: bool, name: str) -> bool:
    if wanted and not inst.engine.word_timestamps:
        if inst.engine.name == "qwen3-asr":
            raise ParamError(name, "word timestamps on qwen3-asr need a forced aligner: set aligner_model "
                                   "to a Qwen3-ForcedAligner-*-hf directory")
        raise ParamError(name, "word timestamps need a Whisper model")
    return wanted


def require_ready(inst: ModelInstance) -> None:
    if inst.engine is None or inst.state not in ("ready", "draining"):
        raise unavailable("not_ready", f"instance is {inst.state}", inst)


def unavailable(code: str, message: str, inst: ModelInstance) -> ApiError:
    return ApiError(503, code, message, {"Retry-After": str(inst.settings.retry_after_seconds)})
