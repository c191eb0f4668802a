"""Cutting long audio at quiet points (app/audio/chunking.py): synthetic timelines for the rules, real speech
for the detector, and joining chunk transcripts back onto one timeline."""
from __future__ import annotations

import numpy as np
import pytest

from app.audio import vad
from app.audio.chunking import (MIN_TAIL_SECONDS, NEAR_SECONDS, OVERLAP_SECONDS, Chunk, cuts, equal_parts, join, join_texts,
                                overlapping, plan_as_heard, plan_chunks, plan_parts)
from app.engines.base import SAMPLE_RATE, Segment, Transcript, Word
from app.selfcheck.speech import SENTENCES
from support import SPEECH, read_16k_mono, shared_audio, speech_with_pauses

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


def test_no_chunk_ends_its_speech_in_the_last_moments_of_a_window():
    # A clear pause at 29.2-30.5 s: cut there, the chunk's speech would run to 29.2 s of a 30 s window,
    # where Whisper leaves words for a next window the chunk does not have. The earlier pause wins.
    speech = stretches((0.5, 20), (20.6, 29.2), (30.5, 45))
    audio = np.zeros(46 * S, np.float32)
    chunks = plan_chunks(audio, 30, speech)
    assert chunks[0].end == int(20.3 * S) and covers(chunks, len(audio))
    # Speech that ends early enough before the same limit keeps the late cut.
    speech = stretches((0.5, 20), (20.6, 28.4), (29.6, 45))
    assert plan_chunks(audio, 30, speech)[0].end == int(29.0 * S)


def test_unbroken_speech_is_cut_at_its_quietest_frame_with_overlap():
    rng = np.random.default_rng(0)
    audio = (0.3 * rng.standard_normal(50 * S)).astype(np.float32)
    quiet = int(27.3 * S)
    audio[quiet:quiet + S // 10] *= 0.01
    chunks = plan_chunks(audio, 30, stretches((0, 50)), OVERLAP_SECONDS)
    cut = cuts(chunks)[0]
    assert abs(cut - (quiet + S // 20)) <= S // 10
    # Both chunks hold OVERLAP_SECONDS on each side of the cut, and neither is longer than 30 s.
    overlap = int(OVERLAP_SECONDS * S)
    assert (chunks[0].end, chunks[1].start) == (cut + overlap, cut - overlap)
    assert chunks[0].start == 0 and chunks[-1].end == len(audio) and all(c.speech for c in chunks)
    assert all(c.end - c.start <= 30 * S for c in chunks)
    assert overlapping(chunks, 0) and overlapping(chunks, 1)


def test_long_unbroken_speech_keeps_every_chunk_within_the_limit():
    rng = np.random.default_rng(1)
    audio = (0.3 * rng.standard_normal(100 * S)).astype(np.float32)
    chunks = plan_chunks(audio, 10, stretches((0, 100)), OVERLAP_SECONDS)
    ends = cuts(chunks)
    assert chunks[0].start == 0 and chunks[-1].end == len(audio) and len(chunks) >= 10
    assert all(c.end - c.start <= 10 * S for c in chunks)
    for a, b, cut in zip(chunks, chunks[1:], ends):
        assert a.end - cut == cut - b.start == int(OVERLAP_SECONDS * S)
    # Without overlap (an engine that cannot time words) the chunks meet at the cuts.
    assert covers(plan_chunks(audio, 10, stretches((0, 100))), len(audio))


def test_no_sliver_of_audio_is_left_after_a_cut():
    # The only pause after the first second lies in the last 0.6 s: cutting there would leave a chunk
    # of 0.3 s, which an engine refuses (and the first pause would leave one of 0.25 s).
    audio = np.zeros(int(30.5 * S), np.float32)
    chunks = plan_chunks(audio, 30, stretches((0.5, 29.9)))
    assert chunks[0].start == 0 and chunks[-1].end == len(audio) and len(chunks) == 2
    assert all(MIN_TAIL_SECONDS * S <= c.end - c.start <= 30 * S for c in chunks)


def test_silence_only_chunks_are_marked():
    audio = np.zeros(70 * S, np.float32)
    chunks = plan_chunks(audio, 30, stretches((2, 10)))
    assert covers(chunks, len(audio))
    assert [c.speech for c in chunks] == [True] + [False] * (len(chunks) - 1)


def test_real_speech_is_cut_in_the_silence_between_clips():
    jfk = read_16k_mono(shared_audio("setA/jfk.flac"))
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


# Joining chunks that overlap around a cut inside speech ------------------------------------------

def timed(words: str, start: float, step: float = 0.4, skew: float = 0.0) -> Transcript:
    """A one-segment transcript of ``words`` spoken ``step`` apart from ``start`` (chunk time),
    each word timed ``skew`` late."""
    items = tuple(Word(round(start + i * step + skew, 3), round(start + (i + 1) * step + skew, 3), " " + w)
                  for i, w in enumerate(words.split()))
    return Transcript(" ".join(words.split()), "en", 0.0,
                      [Segment(items[0].start, items[-1].end, " ".join(words.split()), items)])


def joined_words(joined: Transcript) -> list[str]:
    return [w.word.strip() for s in joined.segments for w in s.words]


def test_a_word_across_the_cut_is_kept_once_and_none_is_lost():
    # One cut inside speech at 10 s, chunks overlapping 8.5-11.5 s. The words are 0.4 s apart from
    # 0 s: "w25" spans 10.0-10.4 s, "w24" 9.6-10.0 s. Each chunk timed them a little differently and
    # garbled the words at its own edge of the overlap ("xx" at the end of the first, "yy" at the
    # start of the second), which the join must not keep.
    words = [f"w{i}" for i in range(50)]
    chunks = [Chunk(0, int(11.5 * S), True), Chunk(int(8.5 * S), 20 * S, True)]
    first = timed(" ".join(words[:28] + ["xx"]), 0.0, skew=0.08)      # 0-11.6 s, the last one garbled
    second = timed(" ".join(["yy"] + words[22:]), 8.4 - 8.5, skew=-0.1)  # from 8.4 s absolute
    joined = join([first, second], chunks, 20.0)
    assert joined_words(joined) == words
    assert joined.text.split() == words
    starts = [w.start for s in joined.segments for w in s.words]
    assert starts == sorted(starts)


def test_a_word_timed_across_the_cut_by_both_chunks_is_not_doubled_or_lost():
    # "w24" spans 9.8-10.2 s, its middle on the cut at 10 s; one chunk times it 0.15 s early, the
    # other 0.15 s late: splitting by middles alone would keep it twice (or, the other way round, never).
    words = [f"w{i}" for i in range(50)]
    chunks = [Chunk(0, int(11.5 * S), True), Chunk(int(8.5 * S), 20 * S, True)]
    for skew_first, skew_second in ((-0.15, 0.15), (0.15, -0.15)):
        first = timed(" ".join(words[:29]), 0.2, skew=skew_first)
        second = timed(" ".join(words[21:]), 0.2 + 21 * 0.4 - 8.5, skew=skew_second)
        assert joined_words(join([first, second], chunks, 20.0)) == words


def test_chunks_that_agree_on_no_word_split_at_the_cut():
    chunks = [Chunk(0, int(11.5 * S), True), Chunk(int(8.5 * S), 20 * S, True)]
    first = timed("a b c d e f g h i j k l m n o p q r s t u v w x y z", 0.0)       # 0-10.4 s
    second = timed("A1 B1 C1 D1 E1 F1 G1 H1 I1 J1 K1 L1 M1 N1 O1", 8.6 - 8.5)      # 8.6-14.6 s
    kept = joined_words(join([first, second], chunks, 20.0))
    assert kept[-1] == "O1" and "y" in kept and "z" not in kept and "C1" not in kept and "D1" in kept


def test_chunks_that_meet_at_a_pause_are_joined_whole():
    chunks = [Chunk(0, 10 * S, True), Chunk(10 * S, 20 * S, True)]
    first, second = timed("a b c", 8.0), timed("a b c", 0.2)  # the same words after the pause: kept
    assert joined_words(join([first, second], chunks, 20.0)) == ["a", "b", "c", "a", "b", "c"]


def test_the_language_is_the_one_of_most_of_the_speech():
    chunks = [Chunk(0, 10 * S, True), Chunk(10 * S, 40 * S, True), Chunk(40 * S, 50 * S, True)]
    parts = [Transcript("Hello", "en", 10.0, [], 0.9), Transcript("Hallo", "de", 30.0, [], 0.8),
             Transcript("", "und", 10.0, [])]
    joined = join(parts, chunks, 50.0)
    assert joined.language == "de" and joined.language_probability == 0.8 and joined.text == "Hello Hallo"
    # A chunk in no language the model could name does not outvote one it could.
    parts = [Transcript("Hello", "en", 10.0, [], 0.9), Transcript("Hmm", "und", 30.0, []), parts[2]]
    assert join(parts, chunks, 50.0).language == "en"


# Planning while VAD listens (app.audio.vad.hear_stretches, chunking.plan_as_heard) ----------------------

def faster_whispers_stretches(audio: np.ndarray) -> list[dict]:
    from faster_whisper.vad import VadOptions, get_speech_timestamps
    return get_speech_timestamps(audio.copy(), VadOptions(min_silence_duration_ms=vad.STRETCH_PAUSE_MS, speech_pad_ms=100))


def before(stretches: list[dict], known: int) -> list[tuple[int, int]]:
    return [(s["start"], min(s["end"], known)) for s in stretches if s["start"] < known]


def listening_audio() -> dict[str, np.ndarray]:
    """Speech the project makes, with pauses long and short, ending in speech or in silence and on a
    frame boundary or not; real recordings too where ../shared is present."""
    spoken, _ = speech_with_pauses(*SENTENCES[:4], pause=0.4)
    clips = {"spoken": spoken, "spoken, cut mid-word": spoken[: len(spoken) // 512 * 512 - 9000],
             "spoken on a frame boundary": spoken[: len(spoken) // 512 * 512],
             "silence": np.zeros(20 * S, np.float32),
             "noise": np.random.default_rng(3).normal(0, 0.1, 20 * S).astype(np.float32)}
    if (SPEECH / "setA/jfk.flac").exists():
        clips["jfk, three times"] = np.tile(read_16k_mono(shared_audio("setA/jfk.flac")), 3)
    return clips


@pytest.mark.parametrize("block_seconds", [0.05, 1, 16])
def test_vad_heard_block_by_block_finds_faster_whispers_stretches_and_never_takes_one_back(block_seconds):
    for name, audio in listening_audio().items():
        heard = list(vad.hear_stretches(audio, block_seconds=block_seconds))
        final, known = heard[-1]
        assert known == len(audio) and final == faster_whispers_stretches(audio), name
        assert [k for _, k in heard] == sorted(k for _, k in heard), name
        for stretches, known in heard:  # what was final when it was heard stays so
            assert before(stretches, known) == before(final, known), (name, known)


def heard_in_steps(speech: list[dict], total: int, step: int):
    """What VAD would have said of ``speech`` after each ``step`` samples, and how far it was asked."""
    asked = [0]

    def steps():
        for known in list(range(step, total, step)) + [total]:
            asked[0] = known
            yield [{"start": s["start"], "end": min(s["end"], known)} for s in speech if s["start"] < known], known
    return steps(), asked


def test_chunks_planned_as_vad_listens_are_the_whole_plan_and_come_before_it_ends():
    rng = np.random.default_rng(7)
    for trial in range(200):
        total = int(rng.uniform(40, 400) * S)
        speech, at = [], int(rng.uniform(0, 2) * S)
        while at < total:  # talk and pauses of every length, runs of speech longer than a chunk too
            end = min(total, at + int(rng.choice([rng.uniform(0.3, 8), rng.uniform(20, 70)]) * S))
            speech.append({"start": at, "end": end})
            at = end + int(rng.choice([rng.uniform(0.05, 0.6), rng.uniform(0.6, 4)]) * S)
        audio = rng.normal(0, 0.01, total).astype(np.float32)
        overlap = OVERLAP_SECONDS if trial % 2 else 0.0
        whole = plan_chunks(audio, 30, speech, overlap)
        step = int(rng.uniform(0.1, 10) * S)
        steps, asked = heard_in_steps(speech, total, step)
        planned = []
        for chunk in plan_as_heard(audio, 30, steps, overlap):
            if not planned:  # the first chunk needs no more than its own window heard
                assert asked[0] <= 30 * S + step, trial
            planned.append(chunk)
        assert planned == whole, trial


def test_chunks_longer_than_a_window_are_equal_parts_as_many_as_a_multiple_of_the_lanes():
    # 4 s sentences with 0.8 s pauses: a clear pause every 4.8 s.
    def talk(seconds: float) -> tuple[np.ndarray, list[dict]]:
        spans, t = [], 0.5
        while t + 4 < seconds:
            spans.append((t, t + 4))
            t += 4.8
        return np.zeros(int(seconds * S), np.float32), stretches(*spans)

    def lengths(audio, speech, limit, parts=1):
        chunks = plan_chunks(audio, limit, speech, parts=parts)
        assert covers(chunks, len(audio)) and all(c.end - c.start <= limit * S for c in chunks)
        for chunk in chunks[:-1]:
            assert not any(s["start"] < chunk.end < s["end"] for s in speech), "a cut fell inside speech"
        return [(c.end - c.start) / S for c in chunks]

    audio, speech = talk(418)
    # At most 120 s: four parts of about 104.5 s (to within one sentence), not 3 x 118 s and 64 s.
    assert lengths(audio, speech, 120) == pytest.approx([104.5] * 4, abs=4.8)
    # Four lanes' slots: still four parts; eight: eight.
    assert lengths(audio, speech, 120, parts=4) == pytest.approx([104.5] * 4, abs=4.8)
    assert lengths(audio, speech, 120, parts=8) == pytest.approx([52.25] * 8, abs=4.8)
    audio, speech = talk(300)
    assert lengths(audio, speech, 120) == pytest.approx([100] * 3, abs=4.8)
    assert lengths(audio, speech, 120, parts=2) == pytest.approx([75] * 4, abs=4.8)   # two lanes: an even count
    # One window at most: cut as late as a clear pause allows, whatever the lanes.
    assert lengths(audio, speech, 30, parts=2) == lengths(audio, speech, 30) and min(lengths(audio, speech, 30)[:-1]) > 25
    # More slots (a GPU's batches) than windows: chunks of one window, as with a limit of one window.
    assert lengths(audio, speech, 120, parts=16) == lengths(audio, speech, 30)


def planned_parts(seconds: float, speech: list[dict], max_seconds: float, parts: int):
    """``plan_parts`` on ``seconds`` of audio with these stretches, for lanes of ``parts`` slots: the
    parts as (start, end) seconds, and each range VAD was asked about."""
    audio, asked = np.zeros(int(seconds * S), np.float32), []

    def listen(low, high):
        asked.append((low / S, high / S))
        return speech

    limit, count = equal_parts(len(audio), max_seconds, parts)
    return [(c.start / S, round(c.end / S, 2)) for c in plan_parts(audio, limit, count, listen)], asked


def test_an_equal_part_listens_near_its_share_first_then_across_its_second_half():
    # 200 s for two lanes at most 120 s each: two halves, the cut aimed at 100 s. The only clear pause is
    # at 85-86 s, beyond NEAR_SECONDS of the aim: the planner listens there first, then across the
    # half's second half, and cuts in that pause.
    speech = stretches((0.5, 85), (86, 199.5))
    parts, asked = planned_parts(200, speech, 120, 2)
    assert parts == [(0, 85.5), (85.5, 200)]
    assert asked == [(100 - NEAR_SECONDS, 100 + NEAR_SECONDS), (50, 120)]
    assert [(c.start / S, c.end / S) for c in plan_chunks(np.zeros(200 * S, np.float32), 120, speech, parts=2)] == parts


def test_a_last_part_too_long_for_the_limit_is_cut_again_in_its_second_half():
    # 230 s at most 120 s: two parts aimed at 115 s, but the only clear pause before the limit is at
    # 90 s; the 140 s left are cut again in the pause at 180-181 s. Nothing is asked of VAD past the limit.
    parts, asked = planned_parts(230, stretches((0.5, 89.5), (90.5, 180), (181, 229.5)), 120, 1)
    assert parts == [(0, 90), (90, 180.5), (180.5, 230)]
    assert all(low < high for low, high in asked), asked
