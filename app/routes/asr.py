"""POST /asr: upload -> decode -> (VAD) -> queue -> engine -> format; POST /detect-language.

``transcribe_audio`` is the shared pipeline (decode -> VAD -> queue -> engine); ``app.routes.openai``
serves OpenAI's audio endpoints through the same function and the same parameter checks.
"""
from __future__ import annotations

import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from typing import IO, Callable

from flask import Blueprint, Response, current_app, g, jsonify, request

from app import formats, languages
from app.audio import longform, peers, vad
from app.runtime import metrics
from app.audio.decode import DecodedAudio, decode_audio
from app.engines.base import SAMPLE_RATE, DecodeOptions, Transcript
from app.errors import ApiError
from app.runtime.instance import ModelInstance
from app.routes.openapi import Operation, register
from app.routes.params import TEMPERATURE, Param, ParamError, Params
from app.runtime.queue import JobFuture, QueueFull, result_within

bp = Blueprint("api", __name__)

# Field names clients already use: the common blog recipe, whisper-asr-webservice, OpenAI-style.
UPLOAD_FIELDS = ("audio", "audio_file", "file")
TASKS = ("transcribe", "translate")
MAX_PROMPT_CHARS = 2000  # Whisper keeps the prompt's last 223 tokens; longer text is a client mistake

VAD_FILTER = Param("vad_filter", "boolean", setting="vad_filter", description=(
    "Cut non-speech out with Silero VAD before the model; times stay those of the original audio, and "
    "audio with no speech at all returns an empty transcript without reaching the model."))
LANGUAGE = Param("language", "string", setting="language", description=(
    "A language the model knows, as a code (en) or a name (English); auto or empty: detect it "
    "(multilingual models). Not given: the configured language."))
# whisper-asr-webservice parameters this service does not implement. The value that matches what the
# service does anyway is accepted (encode=true: uploads are always decoded with FFmpeg); any other
# value is refused rather than silently ignored.
ASR_UNSUPPORTED = {"encode": "true", "diarize": "false"}
ASR_PARAMS = Params((
    Param("task", "string", choices=TASKS, default="transcribe",
          description="transcribe, or translate to English (needs a multilingual model)."),
    LANGUAGE,
    Param("output", "string", choices=formats.OUTPUTS, setting="output", description=(
        "json (text, segments, words, timing), txt, srt, vtt, or tsv (start and end in integer "
        "milliseconds, as whisper's CLI writes it).")),
    Param("beam_size", "integer", minimum=1, maximum=10, setting="beam_size", description="Beam width."),
    TEMPERATURE,
    Param("initial_prompt", "string", max_length=MAX_PROMPT_CHARS, default="", description=(
        "Names, spellings or a style for the first window to follow, and with conditioning on previous text "
        "(setting condition_on_previous_text) the windows after it (Whisper keeps the prompt's last 223 tokens).")),
    Param("word_timestamps", "boolean", setting="word_timestamps", description=(
        "In JSON, each segment gets `words`, each {start, end, word, probability}.")),
    VAD_FILTER,
), ASR_UNSUPPORTED, ignore=UPLOAD_FIELDS)
DETECT_PARAMS = Params((VAD_FILTER,), ASR_UNSUPPORTED, ignore=UPLOAD_FIELDS)

register(
    Operation("post", "/asr", "Transcribe (or translate) an audio file", "transcription", params=ASR_PARAMS,
              upload="audio_file", raw_body=True, errors=("400", "413", "415", "422", "503"),
              description=("The audio goes in a multipart field (`audio_file`, `audio` or `file`) or as a raw "
                           "`audio/*` body; any wav, flac, ogg, mp3, m4a or webm. Parameters may be form "
                           "fields or in the query string. Any other parameter is refused with 422."),
              ok={"application/json": {"$ref": "#/components/schemas/Transcript"},
                  **{formats.CONTENT_TYPES[o].split(";")[0]: {"type": "string"} for o in ("txt", "srt", "vtt", "tsv")}}),
    Operation("post", "/detect-language", "Detect the spoken language from the first 30 s", "transcription",
              params=DETECT_PARAMS, upload="audio_file", raw_body=True, errors=("400", "413", "415", "422", "503"),
              ok={"application/json": {"type": "object", "properties": {
                  "language": {"type": "string"}, "confidence": {"type": "number"},
                  "detected_language": {"type": "string"}, "language_code": {"type": "string"}}}}),
)


def instance() -> ModelInstance:
    return current_app.extensions["asr_instance"]


@bp.post("/asr")
def asr():
    inst = instance()
    with inst.track_request():
        return _asr(inst)


def _asr(inst: ModelInstance):
    params = asr_params(inst)
    data = read_upload()
    require_ready(inst)
    if request.headers.get(peers.CHUNK_HEADER) and not inst.ready:
        raise unavailable("draining", "instance is draining: it takes no new chunks", inst)
    options = params.decode_options(inst)
    transcript, future = transcribe_audio(inst, data, options, params.vad_filter)
    response = formats.render(transcript, params.output, {
        "model": inst.model_name,
        "engine": inst.settings.engine,
        "instance": inst.id,
        "device": inst.device,
        "processing_time": round(time.monotonic() - g.request_started, 4),
        "request_id": g.request_id,
    }, words=params.word_timestamps)
    add_server_timing(response, future)
    return response


@dataclass(frozen=True)
class AsrParams:
    """``/asr``'s parameters, checked; ``/v1/jobs`` takes the same ones."""
    output: str
    task: str
    language: str
    beam_size: int
    temperature: float
    initial_prompt: str
    word_timestamps: bool
    vad_filter: bool

    def decode_options(self, inst: ModelInstance) -> DecodeOptions:
        """Language and task are checked against the loaded model (after ``require_ready``)."""
        return DecodeOptions(language=language(inst, self.language), task=checked_task(inst, self.task, "task"),
                             beam_size=self.beam_size, temperature=self.temperature,
                             fallback=inst.settings.temperature_fallback,
                             condition_on_previous_text=inst.settings.condition_on_previous_text,
                             initial_prompt=self.initial_prompt,
                             word_timestamps=checked_words(inst, self.word_timestamps, "word_timestamps"))


def asr_params(inst: ModelInstance) -> AsrParams:
    values = ASR_PARAMS.parse(inst.settings)
    return AsrParams(**{name: values[name] for name in AsrParams.__dataclass_fields__})


@bp.post("/detect-language")
def detect_language():
    inst = instance()
    with inst.track_request():
        vad_filter = DETECT_PARAMS.parse(inst.settings)["vad_filter"]
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
    transcript; the future (None when VAD found no speech and the model was skipped, or the audio went
    in chunks) tells the timing.

    Audio longer than ``chunk_seconds`` (after VAD) is cut at pauses and its chunks decoded side by
    side, here and on idle siblings (``app.audio.longform``). Callers have already called
    ``require_ready``: validating the language needs the loaded engine.
    """
    audio = decoded(inst, data)
    samples, speech = audio.samples, None
    if vad_filter:
        speech = vad.keep_speech(audio.samples)
        if not speech.found:
            # The language of a model with only one (English-only Whisper), else "und": none was heard.
            known = inst.engine.languages
            own = next(iter(known)) if len(known) == 1 else "und"
            return vad.silent(audio.duration, options.language or own), None
        samples = speech.samples
    settings = inst.settings
    from_sibling = bool(request.headers.get(peers.CHUNK_HEADER))  # a sibling's chunk (app.audio.longform)
    if from_sibling:  # cut in a pause; a span longer than chunk_seconds is not cut again
        options = replace(options, ends_in_pause=True)
    if settings.chunking and len(samples) > settings.chunk_seconds * SAMPLE_RATE and not from_sibling:
        transcript, future = chunked(inst, samples, options), None
    else:
        transcript, future = queued(inst, lambda: inst.queue.submit(samples, options))
    if speech is not None:
        transcript = vad.restore_times(transcript, speech, audio.duration)
    if not from_sibling:  # a chunk's audio is counted by the request it came from
        metrics.count_audio(current_app, transcript.duration)
    return transcript, future


def chunked(inst: ModelInstance, samples, options: DecodeOptions) -> Transcript:
    try:
        transcript, placed = longform.transcribe_long(inst, samples, options, g.request_id)
    except QueueFull as e:
        raise unavailable("overloaded", f"instance is busy: {e}", inst) from None
    except FutureTimeout:
        raise ApiError(504, "inference_timeout", "the model did not finish in time") from None
    except ValueError as e:
        raise ParamError(None, f"the engine refused the request: {e}") from None
    g.asr_chunks = ", ".join(f"{lane}={count}" for lane, count in sorted(placed.items()))
    return transcript


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
    if g.get("asr_chunks"):  # where a long recording's chunks were decoded: "asr-7861=3, asr-7862=2"
        response.headers["X-ASR-Chunks"] = g.asr_chunks


def read_upload(fields: tuple[str, ...] = UPLOAD_FIELDS, raw_body: bool = True) -> bytes:
    """The audio bytes from a multipart field or a raw ``audio/*`` body. Filenames are never used."""
    return upload_stream(fields, raw_body).read()


def upload_stream(fields: tuple[str, ...] = UPLOAD_FIELDS, raw_body: bool = True) -> IO[bytes]:
    """The audio as a stream, unread: a multipart field's file, or the raw ``audio/*`` body."""
    if request.mimetype == "multipart/form-data":
        parts = [f for name in fields for f in request.files.getlist(name)]
        if not parts:
            raise ApiError(400, "missing_audio",
                           f"no audio file: send it in a multipart field named {', '.join(fields)}")
        if len(parts) > 1:
            raise ApiError(400, "multiple_files", "send exactly one audio file per request")
        return parts[0].stream
    if raw_body and (request.mimetype.startswith("audio/") or request.mimetype == "application/octet-stream"):
        return request.stream
    if not request.content_length:
        raise ApiError(400, "missing_audio", f"no audio: send multipart field {fields[0]!r}"
                       + (" or an audio/* body" if raw_body else ""))
    raise ApiError(415, "unsupported_media_type",
                   f"Content-Type {request.mimetype or 'none'} is not multipart/form-data"
                   + (" or audio/*" if raw_body else ""))


# Parameters checked against the loaded model ------------------------------------------------------

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
