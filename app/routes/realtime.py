"""``GET /v1/realtime?intent=transcription``: live transcription over a WebSocket, in the OpenAI Realtime
API's transcription protocol, as the official ``openai`` client speaks it.

The client sends ``session.update`` and ``input_audio_buffer.append`` / ``commit`` / ``clear``; the
server answers ``session.created`` / ``session.updated``, ``input_audio_buffer.speech_started`` /
``speech_stopped`` / ``committed`` / ``cleared``, ``conversation.item.input_audio_transcription.delta``
while a turn is spoken and ``...completed`` (or ``...failed``) with each turn's transcript. A bad event
gets an ``error`` event and the stream goes on.

A turn is re-decoded every ``stream_redecode_seconds`` of new audio; the words two successive decodes
agree on go out as deltas (``app.audio.live.LocalAgreement``), and the whole turn is decoded once
more when it ends. Every decode goes through the instance's queue, batching with all other requests,
and hears the turn after the stream's last turns (``CONTEXT_SECONDS`` of their audio, their transcripts
as the decode's prefix) where the engine continues a prefix, else after the end of the stream's
transcript as its prompt (``CONTEXT_CHARS``); so a turn's final decode waits for the turns before it.
A stream holds a gunicorn thread and one of ``max_streams`` slots; the handshake of one more is
refused with 503 and Retry-After, so nginx tries the next instance. When the instance drains, a stream
finishes the turn being spoken (no new one opens), sends its transcript, then says so in an ``error``
event and closes with 1012 (service restart): the client reconnects through nginx to another instance.
"""
from __future__ import annotations

import base64
import binascii
import collections
import json
import logging
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import simple_websocket
from flask import Blueprint, Response, current_app, request

from app import languages
from app.audio.decode import resampler_from
from app.audio.live import LocalAgreement, ServerVad, SpeechProbabilities, TurnDetector
from app.engines.base import SAMPLE_RATE, DecodeOptions
from app.errors import ApiError
from app.routes import asr
from app.routes.openapi import Operation, register
from app.routes.params import Param, Params
from app.runtime.instance import DRAINING, READY, ModelInstance
from app.runtime import metrics
from app.runtime.queue import QueueFull

log = logging.getLogger(__name__)
bp = Blueprint("realtime", __name__)

INPUT_RATE = 24000            # the protocol's audio/pcm: 16-bit little-endian mono at 24 kHz
MIN_COMMIT_MS = 100           # OpenAI refuses to commit less
MAX_MESSAGE_BYTES = 16 * 2**20  # OpenAI's limit on one append is 15 MiB of base64
SUBPROTOCOL = "realtime"      # what OpenAI's server answers a browser that offers subprotocols
POLL_SECONDS = 0.05           # how often a stream with decodes in flight looks at them
# A turn cut at a pause is often a sentence fragment: each decode hears it after the turns before it, so it
# is heard as part of what was being said. Where the engine continues a prefix (DecodeOptions.prefix), the
# audio of the last turns, up to CONTEXT_SECONDS (and one Whisper window with the turn), goes before the
# turn's, their transcripts as the prefix. Measured at 4x on long1.wav and long2.wav (whole), against each
# turn decoded alone: 16.20 -> 13.62 % and 14.73 -> 11.59 % WER, where the transcript as a prompt gave
# 15.17 and 13.00 %; 6 s of context gave 15.48 and 12.78 %, 20 s 13.42 and 11.81 %.
CONTEXT_SECONDS = 12
WINDOW_SECONDS = 30
# Elsewhere the end of the stream's transcript is the decode's prompt, as Whisper conditions a window on
# the text before it: about 40 tokens, the length whisper_streaming's prompt keeps (200 characters).
CONTEXT_CHARS = 200

REALTIME_PARAMS = Params((
    Param("intent", "string", choices=("transcription",), default="transcription",
          description="transcription: the only kind of realtime session this server holds."),
    Param("model", "string", default="",
          description="The served model (GET /v1/models); another name gets an error event."),
))
register(Operation(
    "get", "/v1/realtime", "Live transcription over a WebSocket (OpenAI Realtime, intent=transcription)",
    "openai", params=REALTIME_PARAMS, errors=("422", "503"), ok={}, ok_status="101",
    description=("A WebSocket upgrade (101). Events as in OpenAI's Realtime transcription sessions: audio/pcm "
                 "at 24 kHz in `input_audio_buffer.append`, server VAD turns, `delta` and `completed` "
                 "transcription events. 426 without an upgrade where a stream could open; 503 with "
                 "Retry-After when the instance holds max_streams streams. A browser may offer the "
                 "subprotocols `realtime` and `openai-insecure-api-key.<key>` (its API key).")))


# werkzeug routes a WebSocket handshake only to a rule marked websocket=True, and a plain request only to
# one that is not: the same view serves both, so a plain GET gets 426 rather than werkzeug's 400.
@bp.get("/v1/realtime", websocket=True)
@bp.get("/v1/realtime", endpoint="realtime_plain")
def realtime():
    inst = asr.instance()
    values = REALTIME_PARAMS.parse(inst.settings)
    # Whether a stream could open comes first: a plain GET learns why a browser's handshake was refused
    # (a browser's WebSocket shows no status), and 426 means "upgrade, and you get a stream".
    asr.require_ready(inst)
    if inst.state != READY:
        raise asr.unavailable("draining", "instance is draining: no new streams", inst)
    if inst.streams_open >= inst.settings.max_streams:
        raise streams_full(inst)
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise ApiError(426, "upgrade_required", "GET /v1/realtime is a WebSocket: send Upgrade: websocket",
                       {"Upgrade": "websocket"})
    if not inst.open_stream():
        raise streams_full(inst)
    try:
        # A browser offers "realtime" (and the API key as another subprotocol, which nginx reads):
        # it drops a socket whose handshake names none of those it offered.
        ws = simple_websocket.Server.accept(request.environ, subprotocols=[SUBPROTOCOL],
                                            max_message_size=MAX_MESSAGE_BYTES)
        try:
            Stream(inst, ws, values["model"], current_app._get_current_object()).run()
        except simple_websocket.ConnectionClosed:
            pass   # the client closed the socket while this stream was answering it: nothing is left to say
        except Exception:  # noqa: BLE001 - a bug ends this stream with a close frame, never an HTTP answer on it
            log.exception("live stream failed")
            _close(ws, 1011, "server error")
        finally:
            _close(ws)
    finally:
        inst.close_stream()
    return _Upgraded(status=101)   # for the request's log line; nothing is written


def streams_full(inst: ModelInstance) -> ApiError:
    return asr.unavailable("streams_full", f"instance holds {inst.settings.max_streams} streams already", inst)


def _close(ws, reason: int | None = None, message: str | None = None) -> None:
    """Close the WebSocket unless the client already has."""
    try:
        ws.close(reason=reason, message=message)
    except simple_websocket.ConnectionClosed:
        pass


class _Upgraded(Response):
    """The answer once the WebSocket is over: the socket was the WebSocket's, so nothing more may be
    written on it. gunicorn's gthread worker closes a connection whose app raises StopIteration."""

    def __call__(self, environ, start_response):
        raise StopIteration("WebSocket closed")


class EventError(Exception):
    """A client event this stream refuses: answered with an ``error`` event, the stream goes on."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@dataclass
class Turn:
    """Speech being spoken: from ``start`` (a sample on the stream's timeline) to now."""

    item_id: str
    start: int
    agreement: LocalAgreement = field(default_factory=LocalAgreement)
    decoding: Future | None = None   # the latest decode of the turn so far
    decoded_to: int = 0              # the timeline sample that decode ran up to


@dataclass
class Final:
    """A committed turn waiting for its transcript; finished in commit order."""

    item_id: str
    audio: np.ndarray
    committed_at: float
    future: Future | None = None


class Stream:
    """One WebSocket session: its configuration, audio buffer, turns and decodes."""

    def __init__(self, inst: ModelInstance, ws, url_model: str, app=None):
        self.inst, self.ws, self.app = inst, ws, app
        s = inst.settings
        self.model = inst.model_name
        self.language: str | None = languages.to_code(s.language)
        self.prompt = ""
        self.vad: ServerVad | None = ServerVad()
        self.resampler = resampler_from(INPUT_RATE)
        self.probabilities = SpeechProbabilities()
        self.detector = TurnDetector(self.vad, max_turn_seconds=s.chunk_seconds)
        self.buffer = np.zeros(0, np.float32)
        self.buffer_start = 0            # the timeline sample buffer[0] is
        self.turn: Turn | None = None
        self.finals: collections.deque[Final] = collections.deque()
        self.previous_item: str | None = None
        self.said = ""                   # the end of the completed turns' transcripts (CONTEXT_CHARS)
        self.heard: collections.deque[tuple[np.ndarray, str]] = collections.deque()  # the last turns, (audio, transcript)
        self.url_model = url_model
        self.draining_since: float | None = None

    # The loop -----------------------------------------------------------------------------------

    def run(self) -> None:
        s = self.inst.settings
        opened = last_active = time.monotonic()   # last_active: the client's last message, or a transcript owed
        self.send({"type": "session.created", "session": self.session()})
        if self.url_model and self.url_model != self.model:
            self.send_error(EventError("model_not_found", self._wrong_model(self.url_model), "model"))
        while True:
            now = time.monotonic()
            if now - opened >= s.stream_max_seconds:
                return self._close("session_expired", f"a stream may last {s.stream_max_seconds:g} s")
            busy = self.turn is not None and self.turn.decoding is not None or self.finals
            if busy:  # a client waiting for transcripts (a slow or queued decode) is not idle
                last_active = now
            if now - last_active >= s.stream_idle_seconds:
                return self._close("idle_timeout", f"nothing received for {s.stream_idle_seconds:g} s")
            wait = POLL_SECONDS if busy else min(1.0, s.stream_idle_seconds - (now - last_active))
            try:
                message = self.ws.receive(timeout=max(0.0, wait))
            except simple_websocket.ConnectionClosed:
                return
            if message is not None:
                last_active = time.monotonic()
                self.handle(message)
            self.collect()
            if self.inst.state == DRAINING and self.drain():
                return self._close("instance_draining", "this instance is shutting down; the turn being spoken "
                                   "was transcribed: reconnect to go on", 1012)

    def _close(self, code: str, message: str, close_code: int = 1000) -> None:
        self.send_error(EventError(code, message))
        _close(self.ws, close_code, code)

    def drain(self) -> bool:
        """The instance is draining: let the open turn end (server VAD's silence, a commit or the longest a
        turn may be), open no new one, and say True once every committed turn has its transcript."""
        now = time.monotonic()
        if self.draining_since is None:
            self.draining_since = now
        turn_ends_by = self.draining_since + self.inst.settings.chunk_seconds
        if not self.vad or (self.turn is not None and now >= turn_ends_by):
            # Without server VAD the turn is the buffer, which only the client would commit: commit it now.
            self.commit_open_turn()
            self.turn = None
        return self.turn is None and not self.finals

    def handle(self, message) -> None:
        event_id = None
        try:
            if isinstance(message, bytes):
                raise EventError("invalid_event", "binary messages are not events: send JSON text")
            try:
                event = json.loads(message)
            except ValueError as e:
                raise EventError("invalid_json", f"not JSON: {e}") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise EventError("invalid_event", "an event is a JSON object with a string `type`", "type")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            handler = self.HANDLERS.get(event["type"])
            if handler is None:
                raise EventError("unknown_event", f"{event['type'][:60]!r} is not an event a transcription session "
                                 f"takes ({', '.join(self.HANDLERS)})", "type")
            handler(self, event)
        except EventError as e:
            self.send_error(e, event_id)

    # Client events ------------------------------------------------------------------------------

    def session_update(self, event: dict) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise EventError("invalid_value", "session.update needs a `session` object", "session")
        if session.get("type", "transcription") != "transcription":
            raise EventError("invalid_value", "this server holds transcription sessions only "
                             "(connect with intent=transcription, session.type transcription)", "session.type")
        audio = _object(session, "audio", "session")
        given = _object(audio, "input", "session.audio")
        language, prompt, vad = self.language, self.prompt, self.vad
        if "format" in given:
            fmt = _object(given, "format", "session.audio.input")
            if fmt.get("type", "audio/pcm") != "audio/pcm" or fmt.get("rate", INPUT_RATE) != INPUT_RATE:
                raise EventError("invalid_value", "the input format must be audio/pcm at rate 24000",
                                 "session.audio.input.format")
        if "transcription" in given:
            transcription = _object(given, "transcription", "session.audio.input")
            model = transcription.get("model")
            if model is not None and model != self.model:
                raise EventError("model_not_found", self._wrong_model(model), "session.audio.input.transcription.model")
            if "language" in transcription:
                language = self._language(transcription["language"])
            if "prompt" in transcription:
                prompt = transcription["prompt"] or ""
                if not isinstance(prompt, str) or len(prompt) > asr.MAX_PROMPT_CHARS:
                    raise EventError("invalid_value", f"prompt must be text of at most {asr.MAX_PROMPT_CHARS} "
                                     "characters", "session.audio.input.transcription.prompt")
        if "turn_detection" in given:
            vad = _turn_detection(given["turn_detection"])
        self.language, self.prompt = language, prompt
        if vad != self.vad:
            self.vad = vad
            self.detector = TurnDetector(vad or ServerVad(), start_frame=self.detector.frame,
                                         max_turn_seconds=self.inst.settings.chunk_seconds)
            if self.turn is not None and vad is None:
                self.turn = None   # without VAD the whole buffer is the open turn
        self.send({"type": "session.updated", "session": self.session()})

    def append(self, event: dict) -> None:
        data = event.get("audio")
        if not isinstance(data, str):
            raise EventError("invalid_value", "`audio` must be base64 text of 16-bit PCM", "audio")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("invalid_base64", "`audio` is not valid base64", "audio") from None
        if len(raw) % 2:
            raise EventError("invalid_value", "`audio` must hold whole 16-bit samples (an even number of bytes)",
                             "audio")
        limit = int(self.inst.settings.max_audio_seconds * SAMPLE_RATE)
        pcm = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
        samples = self.resampler.resample_chunk(pcm)
        if len(self.buffer) + len(samples) > limit:
            raise EventError("input_audio_buffer_full", f"the buffer holds at most {self.inst.settings.max_audio_seconds:g} s "
                             "of audio: commit or clear it (or turn server VAD on)", "audio")
        self.buffer = np.concatenate([self.buffer, samples])
        # The detector hears every frame, so its timeline holds when server VAD is switched on later.
        events = self.detector.feed(self.probabilities.add(samples))
        for kind, position in events if self.vad else ():
            if kind == "start" and self.turn is None and self.draining_since is None:
                self.turn = Turn(_id("item"), max(position, self.buffer_start))
                self.send({"type": "input_audio_buffer.speech_started", "item_id": self.turn.item_id,
                           "audio_start_ms": self.turn.start * 1000 // SAMPLE_RATE})
            elif kind == "stop" and self.turn is not None:
                end = min(position, self.end)
                self.send({"type": "input_audio_buffer.speech_stopped", "item_id": self.turn.item_id,
                           "audio_end_ms": end * 1000 // SAMPLE_RATE})
                self.commit_turn(self.turn.item_id, self.turn.start, end)
        if self.vad and self.turn is None:
            # Between turns keep only what a next turn's prefix padding may reach back to.
            keep = self.vad.prefix_padding_ms * SAMPLE_RATE // 1000 + 2 * 512
            self.trim_to(max(self.buffer_start, self.end - keep))
        self.redecode()

    def commit(self, event: dict) -> None:
        held_ms = self.commit_open_turn()
        if held_ms is not None:
            raise EventError("input_audio_buffer_commit_empty", f"buffer too small: at least {MIN_COMMIT_MS} ms of "
                             f"audio is needed, it holds {held_ms} ms")
        self.detector.reset()

    def commit_open_turn(self) -> int | None:
        """Commit the open turn (without server VAD, the buffer); None when done, else the milliseconds
        it holds, fewer than a commit needs."""
        start = self.turn.start if self.turn is not None else self.buffer_start
        if (self.end - start) * 1000 < MIN_COMMIT_MS * SAMPLE_RATE:
            return (self.end - start) * 1000 // SAMPLE_RATE
        self.commit_turn(self.turn.item_id if self.turn is not None else _id("item"), start, self.end)
        return None

    def clear(self, event: dict) -> None:
        self.turn = None
        self.trim_to(self.end)
        self.detector.reset()
        self.send({"type": "input_audio_buffer.cleared"})

    HANDLERS = {"session.update": session_update, "input_audio_buffer.append": append,
                "input_audio_buffer.commit": commit, "input_audio_buffer.clear": clear}

    # Turns and decodes --------------------------------------------------------------------------

    @property
    def end(self) -> int:
        return self.buffer_start + len(self.buffer)

    def trim_to(self, sample: int) -> None:
        self.buffer = self.buffer[sample - self.buffer_start:]
        self.buffer_start = sample

    def audio(self, start: int, end: int) -> np.ndarray:
        return self.buffer[start - self.buffer_start:end - self.buffer_start]

    def commit_turn(self, item_id: str, start: int, end: int) -> None:
        self.send({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": self.previous_item})
        self.previous_item = item_id
        if self.turn is not None and self.turn.decoding is not None:
            self.turn.decoding.cancel()   # a provisional decode still waiting: the final one replaces it
        final = Final(item_id, self.audio(start, end).copy(), time.monotonic())
        if not self.finals:   # else collect() submits it once the turns before it have their transcripts
            final.future = self.submit(final.audio, final=True)
        self.finals.append(final)
        self.turn = None
        self.trim_to(end)

    def redecode(self) -> None:
        """Decode the open turn again once ``stream_redecode_seconds`` of new audio came in."""
        if self.turn is None and not self.vad and len(self.buffer) and self.draining_since is None:
            self.turn = Turn(_id("item"), self.buffer_start)   # without VAD the buffer is the turn
        turn = self.turn
        if turn is None or turn.decoding is not None:
            return
        if self.end - max(turn.decoded_to, turn.start) < self.inst.settings.stream_redecode_seconds * SAMPLE_RATE:
            return
        if self.inst.queue.waiting:
            return   # deltas yield: a turn's final decode or a file waiting in the queue goes first
        turn.decoding = self.submit(self.audio(turn.start, self.end), final=False)
        if turn.decoding is not None:
            turn.decoded_to = self.end

    def submit(self, audio: np.ndarray, final: bool) -> Future | None:
        """Queue a decode; None when the queue is full (a delta waits, a final decode is tried again)."""
        s = self.inst.settings
        context, prefix = self.context(len(audio))
        # Deltas: greedy, for speed, behind every other job in the queue; the turn's transcript: the
        # configured beam and temperature fallback.
        options = DecodeOptions(language=self.language, beam_size=s.beam_size if final else 1,
                                fallback=s.temperature_fallback and final, prefix=prefix,
                                condition_on_previous_text=s.condition_on_previous_text,
                                initial_prompt=(self.prompt if prefix else f"{self.prompt} {self.said}").strip())
        try:
            return self.inst.queue.submit(np.concatenate([*context, audio]), options, low_priority=not final)
        except QueueFull:
            return None

    def context(self, samples: int) -> tuple[list[np.ndarray], str]:
        """The audio of the last turns to hear a turn of ``samples`` after, and their transcripts: those
        that fit in ``CONTEXT_SECONDS`` and, with the turn, in one window; none where the engine does not
        continue a prefix. A turn heard as nothing ends the context: its audio would have no text."""
        if not self.inst.engine.continues_prefix:
            return [], ""
        room = min(CONTEXT_SECONDS, WINDOW_SECONDS - samples / SAMPLE_RATE) * SAMPLE_RATE
        audio: list[np.ndarray] = []
        texts: list[str] = []
        for clip, text in reversed(self.heard):
            if not text or len(clip) > room:
                break
            room -= len(clip)
            audio.insert(0, clip)
            texts.insert(0, text)
        return audio, " ".join(texts)

    def collect(self) -> None:
        """Send what finished decodes tell: deltas of the open turn, then completed turns in order."""
        turn = self.turn
        if turn is not None and turn.decoding is not None and turn.decoding.done():
            future, turn.decoding = turn.decoding, None
            if future.exception() is None:
                before = len(turn.agreement.settled)
                words = turn.agreement.update(future.result().text)
                if words:
                    self.send({"type": "conversation.item.input_audio_transcription.delta", "item_id": turn.item_id,
                               "content_index": 0, "delta": (" " if before else "") + " ".join(words)})
            self.redecode()
        timeout = self.inst.settings.request_timeout_seconds
        while self.finals:
            final = self.finals[0]
            if final.future is None:
                final.future = self.submit(final.audio, final=True)
                if final.future is None and time.monotonic() - final.committed_at < timeout:
                    return
            if final.future is not None and not final.future.done():
                return
            self.finals.popleft()
            error = final.future.exception() if final.future is not None else QueueFull("the queue stayed full")
            if error is not None:
                self.heard.clear()   # the next turn's context would skip this one's words
                self.send({"type": "conversation.item.input_audio_transcription.failed", "item_id": final.item_id,
                           "content_index": 0, "error": {"type": "server_error", "code": "transcription_failed",
                                                         "message": str(error)[:200]}})
                continue
            transcript = final.future.result().text.strip()
            self.said = _last_words(f"{self.said} {transcript}".strip(), CONTEXT_CHARS)
            self.heard.append((final.audio, transcript))
            while sum(len(clip) for clip, _ in self.heard) > CONTEXT_SECONDS * SAMPLE_RATE:
                self.heard.popleft()
            self.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": final.item_id,
                       "content_index": 0, "transcript": transcript,
                       "usage": {"type": "duration", "seconds": round(len(final.audio) / SAMPLE_RATE, 3)}})
            if self.app is not None:
                metrics.observe_turn(self.app, time.monotonic() - final.committed_at)
                metrics.count_audio(self.app, len(final.audio) / SAMPLE_RATE)

    # Server events ------------------------------------------------------------------------------

    def send(self, event: dict) -> None:
        self.ws.send(json.dumps({"event_id": _id("event"), **event}))

    def send_error(self, e: EventError, event_id: str | None = None) -> None:
        self.send({"type": "error", "error": {"type": "invalid_request_error", "code": e.code, "message": e.message,
                                              "param": e.param, "event_id": event_id}})

    def session(self) -> dict:
        """The effective configuration, as session.created and session.updated carry it."""
        vad = self.vad and {"type": "server_vad", "threshold": self.vad.threshold,
                            "prefix_padding_ms": self.vad.prefix_padding_ms,
                            "silence_duration_ms": self.vad.silence_duration_ms}
        return {"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": INPUT_RATE},
            "transcription": {"model": self.model, "language": self.language, "prompt": self.prompt},
            "turn_detection": vad, "noise_reduction": None}}, "include": []}

    def _wrong_model(self, name) -> str:
        return f"model {str(name)[:60]!r} is not served here: this server serves {self.model!r} (GET /v1/models)"

    def _language(self, value) -> str | None:
        if value is None or value == "":
            return languages.to_code(self.inst.settings.language)
        if not isinstance(value, str):
            raise EventError("invalid_value", "language must be a language code", "session.audio.input.transcription.language")
        try:
            return asr.language(self.inst, value)
        except ApiError as e:
            raise EventError("invalid_value", e.message, "session.audio.input.transcription.language") from None


def _last_words(text: str, chars: int) -> str:
    """The end of ``text``, at most ``chars`` characters, starting at a word."""
    if len(text) <= chars:
        return text
    tail = text[-chars:]
    if text[-chars - 1] == " " or " " not in tail:
        return tail
    return tail.split(" ", 1)[1]


def _object(parent: dict, key: str, where: str) -> dict:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EventError("invalid_value", f"{where}.{key} must be an object", f"{where}.{key}")
    return value


def _turn_detection(value) -> ServerVad | None:
    where = "session.audio.input.turn_detection"
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") != "server_vad":
        raise EventError("invalid_value", "turn_detection must be null or {\"type\": \"server_vad\", ...}", where)
    defaults = ServerVad()
    threshold = value.get("threshold", defaults.threshold)
    padding = value.get("prefix_padding_ms", defaults.prefix_padding_ms)
    silence = value.get("silence_duration_ms", defaults.silence_duration_ms)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold < 1:
        raise EventError("invalid_value", "threshold must be a number between 0 and 1", f"{where}.threshold")
    for name, number in (("prefix_padding_ms", padding), ("silence_duration_ms", silence)):
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= 10_000:
            raise EventError("invalid_value", f"{name} must be whole milliseconds from 0 to 10000", f"{where}.{name}")
    return ServerVad(float(threshold), padding, max(silence, 32))
