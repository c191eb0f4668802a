"""Long audio cut into chunks at quiet points, and the chunks' transcripts joined on one timeline.

A chunk is at most ``max_seconds`` long, so chunks can be decoded side by side (as one batch in an
instance, or spread over instances) instead of window after window. Cuts go where nobody speaks:
``plan_chunks`` takes the speech stretches Silero VAD found (``app.audio.vad.speech_stretches``) and cuts
in the middle of the last clear pause (at least ``CLEAR_PAUSE_SECONDS``) in the second half of each
window, else of the longest pause there, so no chunk ends mid-word where a pause exists; the speech
before the cut ends ``END_MARGIN_SECONDS`` before the chunk's limit at the latest. The last
clear pause rather than the longest keeps chunks near a full window: a chunk costs a whole window of
encoder work however short it is, and with the longest pause chunks averaged 23 s of 30 and a
5-minute file took 13 windows instead of window-after-window's 11.

Chunks longer than one Whisper window (``max_seconds`` above ``WINDOW_SECONDS``: spans that
faster-whisper decodes window after window, each window conditioned on the text before it) are
equal parts instead: as many as a multiple of ``parts`` (the slots of the lanes that decode them
side by side) that keeps each within the limit, each cut in the clear pause
nearest its share of the recording, so the lanes finish together (``plan_parts``, which asks VAD
about the audio near each share only). Cut as late as
possible instead, chunks of at most 105 s left long1 (418 s) 103, 104, 96, 103 and 13 s, and ten
recordings of about 7 minutes took 0.55 of faster-whisper's time on two lanes (0.51-0.59), against
0.53 (0.49-0.57) in equal parts of at most 120 s (``bench long-accuracy``).

Only speech that runs on past the limit without any pause is cut inside speech, at the quietest
100 ms of the window's second half, and there the two chunks overlap by ``OVERLAP_SECONDS`` on each
side of the cut: a word the cut runs through is whole in both. ``join`` then keeps each word of the
overlap once (``_splice``): where both chunks heard the same word at the same time near the cut,
the earlier chunk gives the words before it and the later chunk that word and the rest; where they
agree on none, each word goes to the chunk that holds its middle on its side of the cut. That needs
word times, which the chunk decodes around such a cut ask for (``app.audio.longform``). Planning is a pure
function of sample counts, tested on synthetic timelines; ``join`` moves each chunk's segments and
words to absolute times.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from app.engines.base import SAMPLE_RATE, Segment, Transcript, Word

_FRAME = SAMPLE_RATE // 10  # 100 ms: the resolution of a cut inside unbroken speech
CLEAR_PAUSE_SECONDS = 0.5   # a pause between sentences, not a breath inside one (VAD's padding excluded)
OVERLAP_SECONDS = 1.5       # each side of a cut inside speech: a long word and the context to place it
MATCH_SECONDS = 0.5         # how far apart two chunks may time the same word of their overlap
MIN_TAIL_SECONDS = 1.0      # no chunk after a cut shorter than this (an engine refuses a sliver of audio)
# Speech before a cut in a pause ends this long before the chunk's limit (one Whisper window): words in
# a window's last second come back as a segment "to be continued in the next window", and a chunk has
# none. Measured on tiny.en: "Thank you." ending 29.3 s into a 29.7 s chunk, and "appearance of lips
# and mouth" ending 29.2 s into a 29.6 s one, were lost; ending 28.7 s in, both were kept.
END_MARGIN_SECONDS = 1.5
WINDOW_SECONDS = 30.0       # one Whisper window: chunks longer than this are cut into equal parts
NEAR_SECONDS = 10.0         # an equal part's cut: the clear pause nearest its share is looked for this near first


@dataclass(frozen=True)
class Chunk:
    start: int       # first sample, in the whole recording
    end: int         # one past the last sample
    speech: bool     # whether VAD heard any speech in it (decoded all the same unless vad_filter removed silence)
    # Cut inside speech at its end: it overlaps the next chunk (known as the planner yields it; not stored).
    overlaps_next: bool = field(default=False, compare=False)

    @property
    def offset(self) -> float:
        return self.start / SAMPLE_RATE


def plan_chunks(samples: np.ndarray, max_seconds: float, speech: Sequence[dict],
                overlap_seconds: float = 0.0, parts: int = 1) -> list[Chunk]:
    """Chunks that cover ``samples`` end to end, each at most ``max_seconds``.

    ``speech`` holds VAD's stretches as ``{"start", "end"}`` in samples, in order. Audio no longer
    than ``max_seconds`` is one chunk. Chunks meet at cuts in pauses; at a cut inside speech they
    overlap by ``overlap_seconds`` on each side (at most a quarter of a chunk), so the cut is the
    middle of the overlap (``cuts``); with none (the default, for a caller that cannot time words to
    merge an overlap) they meet there. Above ``WINDOW_SECONDS`` the chunks are equal parts, as many as
    a multiple of ``parts``.
    """
    seconds, count = equal_parts(len(samples), max_seconds, parts)
    if count:
        return list(plan_parts(samples, seconds, count, lambda low, high: speech, overlap_seconds))
    return list(plan_as_heard(samples, seconds, [(speech, len(samples))], overlap_seconds))


def equal_parts(total: int, max_seconds: float, parts: int) -> tuple[float, int]:
    """How ``total`` samples are cut for lanes with ``parts`` slots in all: ``(max_seconds, count)``,
    ``count`` equal parts (a multiple of ``parts``, each within ``max_seconds``) where chunks may be
    longer than one window; else ``count`` 0 and chunks cut as late as a pause allows, at most
    ``max_seconds`` or, where equal parts would be shorter than a window (each costs a whole window's
    work), at most one window."""
    limit, window = int(max_seconds * SAMPLE_RATE), int(WINDOW_SECONDS * SAMPLE_RATE)
    if limit <= window:
        return max_seconds, 0
    count = max(1, parts) * math.ceil(total / (max(1, parts) * limit))
    if count * window > total:
        return WINDOW_SECONDS, 0
    return max_seconds, count


def plan_parts(samples: np.ndarray, max_seconds: float, count: int, listen: Callable[[int, int], Sequence[dict]],
               overlap_seconds: float = 0.0) -> Iterator[Chunk]:
    """``count`` equal parts of ``samples`` (``equal_parts``), each cut in the clear pause nearest its
    share of what is left, yielded as each cut is made. ``listen(low, high)`` gives VAD's stretches
    there: only the audio near each cut is listened to (``NEAR_SECONDS`` either side, then the rest of
    the part's second half if no clear pause is there), so the lanes start at once, and no part waits
    for VAD to hear the rest of the recording. A part is taken to hold speech (every part is decoded)."""
    total, limit = len(samples), int(max_seconds * SAMPLE_RATE)
    overlap, tail, margin = _allowances(limit, overlap_seconds)
    near = int(NEAR_SECONDS * SAMPLE_RATE)
    begin, position, made = 0, 0, 0   # begin: where the current part starts; position: the last cut

    def pauses_in(low: int, high: int) -> list[tuple[int, int]]:
        return [(a, b) for a, b in _pauses(listen(low, high), high) if a <= begin + limit - margin]

    while total - begin > limit or made + 1 < count:
        target = begin + (total - begin) // max(1, count - made)
        low, high = begin + min(target - begin, limit) // 2, min(begin + limit, total - tail)
        cut, pauses = None, []
        for a, b in ((max(low, target - near), min(high, target + near)), (low, high)):
            if a >= b:   # the aim is past the limit (a last part that would be too long): the half only
                continue
            pauses = pauses_in(a, b)
            cut = _nearest_clear_pause(pauses, a, b, target)
            if cut is not None:
                break
        reach = 0
        if cut is None:
            cut, reach = _cut_anyway(samples, pauses, lambda: pauses_in(position + tail, high), low, high,
                                     position + tail, overlap)
        made += 1
        yield Chunk(begin, cut + reach, True, overlaps_next=reach > 0)
        begin, position = cut - reach, cut
    if total > begin:
        yield Chunk(begin, total, True)


def plan_as_heard(samples: np.ndarray, max_seconds: float, heard: Iterable[tuple[Sequence[dict], int]],
                  overlap_seconds: float = 0.0) -> Iterator[Chunk]:
    """``plan_chunks`` while VAD is still listening: ``heard`` yields ``(stretches, known)``, the
    stretches final before sample ``known`` (``app.audio.vad.hear_stretches``), up to ``len(samples)``.
    Each chunk is yielded as soon as the speech its cut depends on is known (the window it is cut in),
    and the chunks are those ``plan_chunks`` makes of the final stretches."""
    total = len(samples)
    limit = int(max_seconds * SAMPLE_RATE)
    if limit <= 0:
        raise ValueError("max_seconds must be positive")
    overlap, tail, margin = _allowances(limit, overlap_seconds)
    listening = iter(heard)
    speech: Sequence[dict] = []
    known = 0

    def hear(until: int) -> None:
        nonlocal speech, known
        while known < until:
            speech, known = next(listening)

    begin, position = 0, 0   # begin: where the current chunk starts; position: the last cut
    while total - begin > limit:
        low, high = begin + limit // 2, min(begin + limit, total - tail)
        hear(high)
        pauses = [(a, b) for a, b in _pauses(speech, known) if a <= begin + limit - margin]
        cut, reach = _last_clear_pause(pauses, low, high), 0
        if cut is None:
            cut, reach = _cut_anyway(samples, pauses, lambda: pauses, low, high, position + tail, overlap)
        yield Chunk(begin, cut + reach, _overlaps(speech, begin, cut + reach), overlaps_next=reach > 0)
        begin, position = cut - reach, cut
    hear(total)
    if total > begin:
        yield Chunk(begin, total, _overlaps(speech, begin, total))


def cuts(chunks: Sequence[Chunk]) -> list[int]:
    """Where each chunk's own part of the recording ends (the next one's begins), in samples: the
    boundary where chunks meet, the middle of their overlap where they overlap; the last is the end."""
    return [(a.end + b.start) // 2 for a, b in zip(chunks, chunks[1:])] + ([chunks[-1].end] if chunks else [])


def overlapping(chunks: Sequence[Chunk], index: int) -> bool:
    """Whether chunk ``index`` shares audio with a neighbour (a cut inside speech at either end)."""
    return ((index > 0 and chunks[index - 1].end > chunks[index].start)
            or (index + 1 < len(chunks) and chunks[index].end > chunks[index + 1].start))


def join(transcripts: Sequence[Transcript], chunks: Sequence[Chunk], duration: float) -> Transcript:
    """One transcript from the chunks' transcripts (in chunk order), with absolute times; the words of
    an overlap kept once (``_splice``).

    The language is the one most of the speech was in (by the length of each chunk's own part of the
    recording, chunks with text in a determined language only); its probability is kept only when every chunk that reported
    that language gave one (their mean), never invented.
    """
    if len(transcripts) != len(chunks):
        raise ValueError(f"{len(transcripts)} transcripts for {len(chunks)} chunks")
    shifted = [[_shifted(s, c.offset, (c.end - c.start) / SAMPLE_RATE) for s in t.segments]
               for t, c in zip(transcripts, chunks)]
    ends = cuts(chunks)
    keep = [[0, sum(len(s.words) for s in segments)] for segments in shifted]  # word range kept, per chunk
    for i in range(len(chunks) - 1):
        if chunks[i].end > chunks[i + 1].start:
            keep[i][1], keep[i + 1][0] = _splice(_words(shifted[i]), _words(shifted[i + 1]), ends[i] / SAMPLE_RATE)
    segments, texts, weight = [], [], Counter()
    for i, (transcript, chunk) in enumerate(zip(transcripts, chunks)):
        if overlapping(chunks, i):
            own = ((ends[i - 1] if i else 0) / SAMPLE_RATE, ends[i] / SAMPLE_RATE)
            kept = _trimmed(shifted[i], *keep[i], own)
            text = join_texts([s.text.strip() for s in kept if s.text.strip()])
        else:
            kept, text = shifted[i], transcript.text.strip()
        segments.extend(kept)
        if text:
            texts.append(text)
            if transcript.language != "und":  # a chunk whose language went undetermined does not outvote
                weight[transcript.language] += ends[i] - (ends[i - 1] if i else 0)
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


def _words(segments: Sequence[Segment]) -> list[Word]:
    return [w for s in segments for w in s.words]


def _spoken(word: Word) -> str:
    """A word as both chunks would write it: lower case, letters and digits only."""
    return "".join(ch for ch in word.word.lower() if ch.isalnum())


def _middle(item) -> float:
    return (item.start + item.end) / 2


def _splice(before: Sequence[Word], after: Sequence[Word], cut: float) -> tuple[int, int]:
    """Where two overlapping chunks' words join: (how many of ``before``'s words to keep, the first of
    ``after``'s to keep), so that each word of the overlap is kept once.

    Both chunks heard the audio around the cut in full, so they mostly agree on its words and their
    times; they disagree near their own edges, which lie ``OVERLAP_SECONDS`` away. The join is at a
    word both wrote alike and timed within ``MATCH_SECONDS`` of each other, the one nearest the cut
    (a match whose neighbour matches too wins over a lone one: short words recur): ``before``'s words
    up to it, ``after``'s from it on. Where they share no such word, each keeps the words whose middle
    lies on its side of the cut.
    """
    best, best_key = None, None
    for i, a in enumerate(before):
        if abs(_middle(a) - cut) > OVERLAP_SECONDS or not _spoken(a):
            continue
        for j, b in enumerate(after):
            if _spoken(a) != _spoken(b) or abs(_middle(a) - _middle(b)) > MATCH_SECONDS:
                continue
            neighbours = ((i + 1 < len(before) and j + 1 < len(after) and _spoken(before[i + 1]) == _spoken(after[j + 1]))
                          or (i > 0 and j > 0 and _spoken(before[i - 1]) == _spoken(after[j - 1])))
            key = (not neighbours, abs((_middle(a) + _middle(b)) / 2 - cut))
            if best_key is None or key < best_key:
                best, best_key = (i, j), key
    if best is not None:
        return best
    return (sum(1 for w in before if _middle(w) < cut),
            next((j for j, w in enumerate(after) if _middle(w) >= cut), len(after)))


def _trimmed(segments: Sequence[Segment], first: int, stop: int, own: tuple[float, float]) -> list[Segment]:
    """The segments with only the words numbered [first, stop) of the chunk (counted across its
    segments), each cut down to the words it keeps; a segment without words stays where its middle
    lies in the chunk's ``own`` part of the recording."""
    kept, index = [], 0
    for segment in segments:
        if not segment.words:
            if own[0] <= _middle(segment) < own[1]:
                kept.append(segment)
            continue
        numbers = range(index, index + len(segment.words))
        index += len(segment.words)
        words = tuple(w for n, w in zip(numbers, segment.words) if first <= n < stop)
        if len(words) == len(segment.words):
            kept.append(segment)
        elif words:
            kept.append(replace(segment, start=words[0].start, end=words[-1].end,
                                text="".join(w.word for w in words).strip(), words=words))
    return kept


def _allowances(limit: int, overlap_seconds: float) -> tuple[int, int, int]:
    """For chunks of at most ``limit`` samples: the overlap at a cut inside speech, the shortest chunk
    after a cut (``MIN_TAIL_SECONDS``) and the speech-free margin before the limit
    (``END_MARGIN_SECONDS``), each at most a quarter of a chunk."""
    overlap = max(0, min(int(overlap_seconds * SAMPLE_RATE), limit // 4))
    tail = min(int(MIN_TAIL_SECONDS * SAMPLE_RATE), limit // 4)
    margin = min(int(END_MARGIN_SECONDS * SAMPLE_RATE), limit // 4)
    return overlap, tail, margin


def _cut_anyway(samples: np.ndarray, pauses: list[tuple[int, int]], earlier: Callable[[], list[tuple[int, int]]],
                low: int, high: int, first: int, overlap: int) -> tuple[int, int]:
    """A cut where [low, high] holds no clear pause, and how far the chunk reaches past it: the middle of
    the longest pause there (``pauses``), else of the longest from ``first`` on (``earlier()``: the first
    half too, but not so early that it leaves a sliver), else inside speech at the quietest 100 ms, the
    chunks overlapping by ``overlap`` on each side."""
    cut = _best_pause(pauses, low, high)
    if cut is None:
        cut = _best_pause(earlier(), first, high)
    if cut is not None:
        return cut, 0
    return _quietest_frame(samples, low, high - overlap), overlap


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


def _nearest_clear_pause(pauses: list[tuple[int, int]], low: int, high: int, target: int) -> int | None:
    """The middle of the clear pause (its part inside [low, high]) nearest ``target``, or None."""
    clear = int(CLEAR_PAUSE_SECONDS * SAMPLE_RATE)
    middles = [(a + b) // 2 for a, b in ((max(s, low), min(e, high)) for s, e in pauses) if b - a >= clear]
    return min(middles, key=lambda m: abs(m - target), default=None)


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
