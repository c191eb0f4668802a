"""Turn a transcript into what the client asked for: JSON, plain text, SRT, WebVTT or TSV.

The subtitle writers follow whisper's own CLI writers: SRT cues numbered from 1 with
``HH:MM:SS,mmm`` times, WebVTT with a ``WEBVTT`` header and ``HH:MM:SS.mmm`` times, TSV as
``start<TAB>end<TAB>text`` in integer milliseconds.
"""
from __future__ import annotations

from dataclasses import replace

from flask import Response, jsonify

from app.engines import fallback
from app.engines.base import Segment, Transcript, Word
from app.languages import LANGUAGE_NAMES

OUTPUTS = ("json", "txt", "srt", "vtt", "tsv")

CONTENT_TYPES = {
    "txt": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "tsv": "text/tab-separated-values; charset=utf-8",
}

def render(transcript: Transcript, output: str, extra: dict, words: bool = False) -> Response:
    """The /asr response for ``output`` (one of OUTPUTS). With ``words``, each JSON segment lists its
    words as whisper does (``word`` keeps its leading space); subtitles stay one cue per segment."""
    if output == "json":
        return jsonify(**to_dict(transcript, words), **extra)
    return text_response(WRITERS[output](transcript), output)


def to_dict(transcript: Transcript, words: bool = False) -> dict:
    """The transcript part of the JSON answer; ``from_dict`` reads it back (chunks decoded on another
    instance, job results kept in the job database)."""
    return {
        "text": transcript.text,
        "language": transcript.language,
        "language_probability": transcript.language_probability,
        "duration": round(transcript.duration, 3),
        "segments": [
            {"id": i, "start": s.start, "end": s.end, "text": s.text,
             **({"words": [{"start": w.start, "end": w.end, "word": w.word, "probability": w.probability}
                           for w in s.words]} if words else {})}
            for i, s in enumerate(segments(transcript))
        ],
    }


def from_dict(data: dict) -> Transcript:
    return Transcript(
        text=data["text"], language=data["language"], duration=float(data["duration"]),
        language_probability=data.get("language_probability"),
        segments=[Segment(s["start"], s["end"], s["text"],
                          tuple(Word(w["start"], w["end"], w["word"], w.get("probability")) for w in s.get("words", ())))
                  for s in data["segments"]],
    )


def text_response(body: str, output: str) -> Response:
    return Response(body, content_type=CONTENT_TYPES[output])


def to_txt(transcript: Transcript) -> str:
    return transcript.text + "\n"


def to_srt(transcript: Transcript) -> str:
    cues = [f"{i}\n{srt_time(s.start)} --> {srt_time(s.end)}\n{_cue_text(s)}\n"
            for i, s in enumerate(_timed(transcript), start=1)]
    return "\n".join(cues)


def to_vtt(transcript: Transcript) -> str:
    cues = [f"{vtt_time(s.start)} --> {vtt_time(s.end)}\n{_cue_text(s)}\n" for s in _timed(transcript)]
    return "WEBVTT\n\n" + "\n".join(cues)


def to_tsv(transcript: Transcript) -> str:
    rows = ["start\tend\ttext"]
    rows += [f"{round(s.start * 1000)}\t{round(s.end * 1000)}\t{s.text.strip().replace(chr(9), ' ')}"
             for s in segments(transcript)]
    return "\n".join(rows) + "\n"


WRITERS = {"txt": to_txt, "srt": to_srt, "vtt": to_vtt, "tsv": to_tsv}


def srt_time(seconds: float) -> str:
    return _clock(seconds, ",")


def vtt_time(seconds: float) -> str:
    return _clock(seconds, ".")


def _clock(seconds: float, decimal_marker: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def segments(transcript: Transcript) -> list[Segment]:
    """The segments (and their words) with times clamped to the audio: Whisper's last timestamp token
    can lie past the end of a short clip (7.0 s on a 6.0 s one), and no cue should."""
    end_of_audio = round(transcript.duration, 3)

    def clamp(item):
        end = min(item.end, end_of_audio)
        return replace(item, start=min(item.start, end), end=end)

    return [replace(clamp(s), words=tuple(clamp(w) for w in s.words)) for s in transcript.segments]


def _timed(transcript: Transcript) -> list[Segment]:
    """Segments worth a cue: with text (an empty cue ends a subtitle block early in most players)."""
    return [s for s in segments(transcript) if s.text.strip()]


def _cue_text(segment: Segment) -> str:
    # "-->" inside a cue would read as a timing line; whisper's writers do the same replacement.
    return segment.text.strip().replace("-->", "->")


def compression_ratio(text: str) -> float:
    """Whisper's gzip compression ratio of a segment's text (over 2.4 suggests repetition)."""
    return round(fallback.compression_ratio(text), 4) if text else 0.0


def openai_verbose(transcript: Transcript, task: str, temperature: float,
                   with_segments: bool = True, with_words: bool = False) -> dict:
    """OpenAI's verbose_json, with ``segments`` and/or ``words`` as the timestamp granularities ask.
    The engines report neither tokens nor log probabilities per segment: ``tokens`` is empty and
    ``avg_logprob``/``no_speech_prob`` are 0.0 (OpenAI's schema requires numbers);
    ``compression_ratio`` is computed from the text as whisper does; ``temperature`` is the one the
    segment's window was decoded at (after any fallback), else the one asked for. OpenAI's words carry
    no spaces."""
    body = {
        "task": task,
        "language": LANGUAGE_NAMES.get(transcript.language, transcript.language),
        "duration": round(transcript.duration, 3),
        "text": transcript.text,
    }
    timed = segments(transcript)
    if with_words:
        body["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end} for s in timed for w in s.words]
    if with_segments:
        body["segments"] = [
            {"id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text, "tokens": [],
             "temperature": temperature if s.temperature is None else s.temperature, "avg_logprob": 0.0, "compression_ratio": compression_ratio(s.text),
             "no_speech_prob": 0.0}
            for i, s in enumerate(timed)
        ]
    return body
