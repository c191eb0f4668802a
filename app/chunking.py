"""Long audio cut into chunks at quiet points, and the chunks' transcripts joined on one timeline.

A chunk is at most ``max_seconds`` long, so chunks can be decoded side by side (as one batch in an
instance, or spread over instances) instead of window after window. Cuts go where nobody speaks:
``plan_chunks`` takes the speech stretches Silero VAD found (``app.vad.speech_stretches``) and cuts
in the middle of the last clear pause (at least ``CLEAR_PAUSE_SECONDS``) in the second half of each
window, else of the longest pause there, so no chunk ends mid-word where a pause exists. The last
clear pause rather than the longest keeps chunks near a full window: a chunk costs a whole window of
encoder work however short it is, and with the longest pause chunks averaged 23 s of 30 and a
5-minute file took 13 windows instead of window-after-window's 11. Only speech that runs on past the limit without any pause is cut at the
quietest 100 ms of the window's second half. Planning is a pure function of sample counts, tested
on synthetic timelines; ``join`` moves each chunk's segments and words to absolute times.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from app.engines.base import SAMPLE_RATE, Transcript

_FRAME = SAMPLE_RATE // 10  # 100 ms: the resolution of a cut inside unbroken speech
CLEAR_PAUSE_SECONDS = 0.5   # a pause between sentences, not a breath inside one (VAD's padding excluded)


@dataclass(frozen=True)
class Chunk:
    start: int       # first sample, in the whole recording
    end: int         # one past the last sample
    speech: bool     # whether VAD heard any speech in it (a silent chunk need not reach the model)

    @property
    def offset(self) -> float:
        return self.start / SAMPLE_RATE


def plan_chunks(samples: np.ndarray, max_seconds: float, speech: Sequence[dict]) -> list[Chunk]:
    """Chunks that cover ``samples`` end to end, each at most ``max_seconds``.

    ``speech`` holds VAD's stretches as ``{"start", "end"}`` in samples, in order. Audio no longer
    than ``max_seconds`` is one chunk.
    """
    total = len(samples)
    limit = int(max_seconds * SAMPLE_RATE)
    if limit <= 0:
        raise ValueError("max_seconds must be positive")
    pauses = _pauses(speech, total)
    cuts, position = [0], 0
    while total - position > limit:
        cut = _last_clear_pause(pauses, position + limit // 2, position + limit)
        if cut is None:
            cut = _best_pause(pauses, position + limit // 2, position + limit)
        if cut is None:
            cut = _best_pause(pauses, position + 1, position + limit)
        if cut is None:
            cut = _quietest_frame(samples, position + limit // 2, position + limit)
        cuts.append(cut)
        position = cut
    cuts.append(total)
    return [Chunk(a, b, _overlaps(speech, a, b)) for a, b in zip(cuts, cuts[1:]) if b > a]


def join(transcripts: Sequence[Transcript], chunks: Sequence[Chunk], duration: float) -> Transcript:
    """One transcript from the chunks' transcripts (in chunk order), with absolute times.

    The language is the one most of the speech was in (by chunk length); its probability is kept
    only when every chunk that reported that language gave one (their mean), never invented.
    """
    if len(transcripts) != len(chunks):
        raise ValueError(f"{len(transcripts)} transcripts for {len(chunks)} chunks")
    segments, texts, weight = [], [], Counter()
    for transcript, chunk in zip(transcripts, chunks):
        length = (chunk.end - chunk.start) / SAMPLE_RATE
        segments.extend(_shifted(s, chunk.offset, length) for s in transcript.segments)
        if transcript.text.strip():
            texts.append(transcript.text.strip())
            weight[transcript.language] += chunk.end - chunk.start
    language = weight.most_common(1)[0][0] if weight else (transcripts[0].language if transcripts else "und")
    probabilities = [t.language_probability for t in transcripts if t.language == language and t.text.strip()]
    probability = None
    if probabilities and all(p is not None for p in probabilities):
        probability = round(float(np.mean(probabilities)), 4)
    return Transcript(text=join_texts(texts), language=language, duration=duration, segments=segments,
                      language_probability=probability)


def join_texts(texts: Sequence[str]) -> str:
    """Texts joined with a space, except between two characters of scripts written without spaces."""
    out = ""
    for text in texts:
        if out and not (unspaced(out[-1]) and unspaced(text[0])):
            out += " "
        out += text
    return out


def unspaced(char: str) -> bool:
    """Whether ``char`` belongs to a script written without spaces between words (CJK, Thai)."""
    code = ord(char)
    return (0x3000 <= code <= 0x30FF or 0x3400 <= code <= 0x4DBF or 0x4E00 <= code <= 0x9FFF
            or 0xF900 <= code <= 0xFAFF or 0xFF00 <= code <= 0xFFEF or 0x0E00 <= code <= 0x0E7F)


def _shifted(segment, offset: float, length: float):
    """The segment and its words moved by ``offset``, each time first kept within the chunk's own
    ``length`` and each word within its segment: at the end of a chunk the model may time a last word
    past its segment and past the chunk, and it must not reach into the next chunk's stretch."""
    def moved(item, limit: float):
        end = min(item.end, limit)
        return replace(item, start=round(min(item.start, end) + offset, 3), end=round(end + offset, 3))

    end = min(segment.end, length)
    return replace(moved(segment, length), words=tuple(moved(w, end) for w in segment.words))


def _pauses(speech: Sequence[dict], total: int) -> list[tuple[int, int]]:
    """The gaps between speech stretches, the silence before the first and after the last included."""
    edges, position = [], 0
    for stretch in speech:
        if stretch["start"] > position:
            edges.append((position, stretch["start"]))
        position = max(position, stretch["end"])
    if position < total:
        edges.append((position, total))
    if not speech:
        edges = [(0, total)] if total else []
    return edges


def _last_clear_pause(pauses: list[tuple[int, int]], low: int, high: int) -> int | None:
    """The middle of the last pause whose part inside [low, high] is a clear pause, or None."""
    clear = int(CLEAR_PAUSE_SECONDS * SAMPLE_RATE)
    for start, end in reversed(pauses):
        a, b = max(start, low), min(end, high)
        if b - a >= clear:
            return (a + b) // 2
    return None


def _best_pause(pauses: list[tuple[int, int]], low: int, high: int) -> int | None:
    """The middle of the longest pause (its part inside [low, high]), or None where there is none."""
    best, best_length = None, 0
    for start, end in pauses:
        a, b = max(start, low), min(end, high)
        if b - a > best_length:
            best, best_length = (a + b) // 2, b - a
    return best


def _quietest_frame(samples: np.ndarray, low: int, high: int) -> int:
    """The middle of the 100 ms frame with the least energy in [low, high)."""
    span = np.asarray(samples[low:high], dtype=np.float32)
    frames = len(span) // _FRAME
    if frames < 1:
        return high
    energy = np.square(span[: frames * _FRAME]).reshape(frames, _FRAME).mean(axis=1)
    return low + int(np.argmin(energy)) * _FRAME + _FRAME // 2


def _overlaps(speech: Sequence[dict], start: int, end: int) -> bool:
    return any(s["start"] < end and s["end"] > start for s in speech)
