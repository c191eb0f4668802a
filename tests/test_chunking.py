"""Cutting long audio at quiet points (app/chunking.py): synthetic timelines for the rules, real speech
for the detector, and joining chunk transcripts back onto one timeline."""
from __future__ import annotations

import numpy as np
import pytest

from app import vad
from app.chunking import Chunk, join, join_texts, plan_chunks
from app.engines.base import SAMPLE_RATE, Segment, Transcript, Word
from support import SPEECH, read_16k_mono

S = SAMPLE_RATE


def stretches(*spans: tuple[float, float]) -> list[dict]:
    return [{"start": int(a * S), "end": int(b * S)} for a, b in spans]


def covers(chunks: list[Chunk], total: int) -> bool:
    return chunks[0].start == 0 and chunks[-1].end == total and all(
        a.end == b.start for a, b in zip(chunks, chunks[1:]))


def test_short_audio_is_one_chunk():
    audio = np.zeros(10 * S, np.float32)
    assert plan_chunks(audio, 30, stretches((1, 9))) == [Chunk(0, 10 * S, True)]


def test_cuts_fall_in_the_longest_pauses_never_inside_speech():
    # 4 s of speech, then a pause of 0.3 s or 1.2 s in turn: every 10 s holds a long pause.
    speech, long_pauses, t = [], [], 0.5
    for i in range(24):
        pause = 1.2 if i % 2 else 0.3
        speech.append((t, t + 4.0))
        if i % 2:
            long_pauses.append((t + 4.0, t + 4.0 + pause))
        t += 4.0 + pause
    audio = np.zeros(int(t * S) + S, np.float32)
    chunks = plan_chunks(audio, 20, stretches(*speech))
    assert covers(chunks, len(audio)) and len(chunks) >= 5
    assert all(c.end - c.start <= 20 * S for c in chunks)
    for chunk in chunks[:-1]:
        assert not any(int(a * S) < chunk.end < int(b * S) for a, b in speech), "a cut fell inside speech"
        assert any(int(a * S) <= chunk.end <= int(b * S) for a, b in long_pauses), "a short pause won"


def test_the_last_clear_pause_wins_over_an_earlier_longer_one():
    # In the second half of the first 30 s window: a 2 s pause at 16-18 s, a 0.6 s one at 27-27.6 s,
    # and a breath of 0.3 s at 29 s. The chunk runs to the late clear pause: nearly a whole window.
    speech = stretches((0.5, 16), (18, 27), (27.6, 29), (29.3, 40))
    audio = np.zeros(41 * S, np.float32)
    chunks = plan_chunks(audio, 30, speech)
    assert chunks[0].end == int(27.3 * S) and covers(chunks, len(audio))
    # With only breaths in the second half, the longest of them.
    speech = stretches((0.5, 20), (20.3, 24), (24.4, 40))
    assert plan_chunks(audio, 30, speech)[0].end == int(24.2 * S)


def test_unbroken_speech_is_cut_at_its_quietest_frame():
    rng = np.random.default_rng(0)
    audio = (0.3 * rng.standard_normal(50 * S)).astype(np.float32)
    quiet = int(27.3 * S)
    audio[quiet:quiet + S // 10] *= 0.01
    chunks = plan_chunks(audio, 30, stretches((0, 50)))
    assert abs(chunks[0].end - (quiet + S // 20)) <= S // 10
    assert covers(chunks, len(audio)) and all(c.speech for c in chunks)


def test_silence_only_chunks_are_marked():
    audio = np.zeros(70 * S, np.float32)
    chunks = plan_chunks(audio, 30, stretches((2, 10)))
    assert covers(chunks, len(audio))
    assert [c.speech for c in chunks] == [True] + [False] * (len(chunks) - 1)


def test_real_speech_is_cut_in_the_silence_between_clips():
    jfk = read_16k_mono(SPEECH / "setA" / "jfk.flac")
    gap = np.zeros(3 * S, np.float32)
    audio = np.concatenate([jfk, gap, jfk, gap, jfk])
    chunks = plan_chunks(audio, 30, vad.speech_stretches(audio))
    assert covers(chunks, len(audio)) and len(chunks) >= 2
    for chunk in chunks[:-1]:
        seconds = chunk.end / S
        in_gap = any(k * (len(jfk) + len(gap)) / S + len(jfk) / S - 0.5 <= seconds
                     <= (k + 1) * (len(jfk) + len(gap)) / S + 0.3 for k in range(2))
        assert in_gap, f"cut at {seconds:.2f} s is not in a gap between the clips"


def test_join_shifts_times_and_keeps_order():
    chunks = [Chunk(0, 10 * S, True), Chunk(10 * S, 25 * S, True)]
    first = Transcript("Hello there.", "en", 10.0, [Segment(1.0, 3.0, "Hello there.", (Word(1.0, 1.5, " Hello", 0.9),))],
                       language_probability=0.8)
    second = Transcript("General Kenobi.", "en", 15.0, [Segment(2.0, 4.5, "General Kenobi.")],
                        language_probability=0.6)
    joined = join([first, second], chunks, 25.0)
    assert joined.text == "Hello there. General Kenobi."
    assert [(s.start, s.end) for s in joined.segments] == [(1.0, 3.0), (12.0, 14.5)]
    assert joined.segments[0].words[0].start == 1.0
    assert joined.duration == 25.0 and joined.language == "en" and joined.language_probability == pytest.approx(0.7)


def test_join_keeps_each_chunk_s_times_within_the_chunk():
    chunks = [Chunk(0, 10 * S, True), Chunk(10 * S, 20 * S, True)]
    first = Transcript("a b", "en", 10.0, [Segment(8.0, 10.0, "a b", (Word(8.0, 9.0, " a"), Word(9.5, 10.4, " b")))])
    second = Transcript("c", "en", 10.0, [Segment(0.0, 1.0, "c", (Word(0.0, 1.0, " c"),))])
    joined = join([first, second], chunks, 20.0)
    assert [(w.start, w.end) for w in joined.segments[0].words] == [(8.0, 9.0), (9.5, 10.0)]
    assert joined.segments[1].start == 10.0


def test_join_never_invents_a_probability():
    chunks = [Chunk(0, S, True), Chunk(S, 2 * S, True)]
    parts = [Transcript("a", "de", 1.0, [], language_probability=None), Transcript("b", "de", 1.0, [], 0.9)]
    assert join(parts, chunks, 2.0).language_probability is None


def test_join_texts_spaces_only_between_spaced_scripts():
    assert join_texts(["你好。", "世界"]) == "你好。世界"
    assert join_texts(["Hello.", "World"]) == "Hello. World"
    assert join_texts(["你好", "World"]) == "你好 World"
