"""Long recordings cut at pauses and decoded chunk by chunk (app/audio/longform.py): the same words as
window-after-window decoding on real speech, fair queueing next to short requests, a fast 503 when
there is no room, and the scheduler's rules for lanes that are busy, fail or are cancelled; and in
spans of several windows, each conditioned on the text before it (``span_seconds``)."""
from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

import jiwer

from app.audio import chunking, longform, vad
from app.config import load_settings
from app.audio.chunking import Chunk
from app.engines.base import SAMPLE_RATE, DecodeOptions, Transcript
from app.runtime.instance import ModelInstance
from app.audio.peers import Busy
from app.runtime.queue import QueueFull, result_within
from support import (JFK_REFERENCE, shared_audio, english_set_a, espeak, normalize, read_16k_mono, set_a_sequence,
                     speech_with_pauses, wer)


def loaded(run_dir, **overrides) -> ModelInstance:
    instance = ModelInstance(load_settings(env={}, overrides={"max_queue": 4, "run_dir": str(run_dir), **overrides}))
    instance.load_now()
    assert instance.ready, instance.error
    return instance


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    """Chunks of one window (``span_seconds = 0``): what every engine but a conditioning one decodes."""
    instance = loaded(tmp_path_factory.mktemp("run"), span_seconds=0)
    yield instance
    instance.queue.stop()


@pytest.fixture(scope="module")
def spanning(tmp_path_factory):
    """The defaults: faster-whisper conditioning on previous text, spans of at most ``span_seconds``."""
    instance = loaded(tmp_path_factory.mktemp("run"))
    yield instance
    instance.queue.stop()


def long_recording() -> tuple[np.ndarray, list[str]]:
    """About 140 s: English set A with 1 s pauses, then again in reverse order with 0.6 s pauses."""
    forward, places = set_a_sequence(gap=1.0)
    backward, places_back = set_a_sequence(gap=0.6, rows=english_set_a()[::-1])
    return np.concatenate([forward, backward]), [r for *_, r in places + places_back]


def test_chunks_give_the_same_words_as_window_after_window(inst):
    samples, references = long_recording()
    duration = len(samples) / SAMPLE_RATE
    options = DecodeOptions(beam_size=inst.settings.beam_size)
    whole = inst.engine.transcribe(samples, options)
    chunked, placed = longform.transcribe_long(inst, samples, options)
    reference = " ".join(references)
    # What a user sees: about the words of window-after-window decoding. int8 kernels differ between
    # CPUs, so the words do in detail; the tolerance is a few words of these 222, and no more than
    # three fewer of the reference words heard (a chunk lost, or its end, costs far more).
    whole_wer, chunked_wer = wer([reference], [whole.text]), wer([reference], [chunked.text])
    assert chunked_wer <= whole_wer + 0.06, (whole_wer, chunked_wer, whole.text, chunked.text)
    heard = [jiwer.process_words(normalize(reference), normalize(t.text)).hits for t in (whole, chunked)]
    assert heard[1] >= heard[0] - 3, (heard, whole.text, chunked.text)
    assert placed == {inst.id: placed[inst.id]} and placed[inst.id] >= 5  # fanout finds no siblings here
    # Absolute times, in order, within the audio; the last words near its end.
    starts = [s.start for s in chunked.segments]
    assert starts == sorted(starts) and all(s.end <= duration + 0.5 for s in chunked.segments)
    assert chunked.segments[-1].end > duration - 10 and chunked.duration == pytest.approx(duration)


def long_then_short(instance: ModelInstance, samples: np.ndarray, options: DecodeOptions):
    """``transcribe_long``'s result for ``samples``, and when it started and ended and when a short
    request (JFK, 11 s) sent to the same instance once its first chunk was decoding came back."""
    marks: dict[str, float] = {}
    result = {}

    def long_request():
        marks["long_start"] = time.monotonic()
        result["long"] = longform.transcribe_long(instance, samples, options)
        marks["long_end"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.monotonic() + 60
    while instance.queue.in_flight == 0 and time.monotonic() < deadline:  # the first chunk is decoding
        time.sleep(0.01)
    short = read_16k_mono(shared_audio("setA/jfk.flac"))
    result_within(instance.queue.submit(short, options), 120)
    marks["short_end"] = time.monotonic()
    thread.join(timeout=300)
    return result["long"], marks


def test_a_recording_in_spans_gives_the_words_of_window_after_window_and_lets_a_short_request_in(spanning):
    samples, references = long_recording()           # about 140 s: two spans of about 70 s on one lane
    options = DecodeOptions(beam_size=spanning.settings.beam_size)
    whole = spanning.engine.transcribe(samples, options)   # faster-whisper's defaults, conditioning included
    (spans, placed), marks = long_then_short(spanning, samples, options)
    assert placed == {spanning.id: 2}
    # The two spans of the plan, each decoded whole with its options (conditioning on previous text, the
    # engine's default, included): word for word. And as faster-whisper decodes each span (the span's
    # last window finished on its own encoder output may move a word on some CPU).
    plan = longform.split(samples, longform.longest_chunk(spanning.settings, True), True)
    alone = [spanning.engine.transcribe(samples[c.start:c.end], longform.chunk_options(options, plan, i))
             for i, c in enumerate(plan)]
    assert len(plan) == 2
    assert normalize(spans.text) == normalize(" ".join(t.text for t in alone))
    bare = " ".join(spanning.engine.transcribe(samples[c.start:c.end], options).text for c in plan)
    assert wer([bare], [spans.text]) <= 0.02, (bare, spans.text)
    # About the words of window after window: a cut moves a few, as for chunks of one window (one
    # CPU's int8 kernels drop "I'm Abigail Claflin. You can call me Abbie." where the second span
    # starts, and faster-whisper on that span alike).
    reference = " ".join(references)
    whole_wer, spans_wer = wer([reference], [whole.text]), wer([reference], [spans.text])
    assert spans_wer <= whole_wer + 0.06, (whole_wer, spans_wer, whole.text, spans.text)
    starts = [s.start for s in spans.segments]
    assert starts == sorted(starts) and spans.segments[-1].end > len(samples) / SAMPLE_RATE - 10
    # The short request waited for the first span, not both: a span holds one queue slot at a time.
    assert marks["long_end"] - marks["short_end"] > 0.3 * (marks["long_end"] - marks["long_start"]), marks


def test_a_chunk_takes_one_window_where_faster_whisper_would_open_a_second(inst, monkeypatch):
    # Whisper often leaves the last segment of a chunk open near the window's end; faster-whisper then
    # encodes a second window from its start. A chunk (ends_in_pause) has it decoded again on the same
    # encoder output instead: one encoder call per chunk, the same segments.
    samples, _ = set_a_sequence(gap=1.0)  # about 70 s: 3 chunks
    engine, windows = inst.engine, []
    for owner, name in ((engine, "_encode"), (engine._model, "encode")):  # lockstep, faster-whisper
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda batch, *a, _f=original, **k: windows.append(len(batch)) or _f(batch, *a, **k))
    chunks = longform.split(samples, inst.settings.chunk_seconds)
    options = DecodeOptions(beam_size=inst.settings.beam_size)
    decoded = {}
    for ends_in_pause in (False, True):
        windows.clear()
        decoded[ends_in_pause] = [engine.transcribe(samples[c.start:c.end], replace(options, ends_in_pause=ends_in_pause))
                                  for c in chunks]
        decoded[ends_in_pause, "windows"] = sum(windows)
    assert len(chunks) >= 3
    assert decoded[False, "windows"] > len(chunks)   # the case is there: faster-whisper opened second windows
    assert decoded[True, "windows"] == len(chunks)
    for c, plain, chunk in zip(chunks, decoded[False], decoded[True]):
        # The same segments with the same words. Times as a user sees them (within the chunk's audio)
        # agree to a second and a half, but for the last segment's end: faster-whisper's second window
        # timed that on other audio (31.1 s on a 29.6 s chunk on one CPU, 28.3 s on another; on a Zen 5
        # 19.52 s where the speech ends at 17.75 s and the chunk's own window said 17.76 s). It is held
        # to where VAD hears the speech end instead: no more than a second before, a second and a half after.
        length = (c.end - c.start) / SAMPLE_RATE
        assert len(chunk.segments) == len(plain.segments)
        assert [s.start for s in chunk.segments] == pytest.approx([s.start for s in plain.segments], abs=0.5)
        assert [min(s.end, length) for s in chunk.segments[:-1]] == pytest.approx(
            [min(s.end, length) for s in plain.segments[:-1]], abs=1.5)
        speech_end = (vad.stretches_between(samples, c.start, c.end)[-1]["end"] - c.start) / SAMPLE_RATE
        assert speech_end - 1.0 <= min(chunk.segments[-1].end, length) <= speech_end + 1.5, (
            speech_end, chunk.segments[-1], plain.segments[-1])
        assert all(s.start < min(s.end, length) for s in chunk.segments)
        assert wer([plain.text], [chunk.text]) <= 0.1


def test_a_short_request_waits_for_one_chunk_not_the_whole_recording(inst):
    samples, _ = set_a_sequence(gap=1.0)  # about 70 s: 3-4 chunks
    _, marks = long_then_short(inst, samples, DecodeOptions(beam_size=inst.settings.beam_size))
    assert marks["short_end"] < marks["long_end"]
    # Most of the recording was decoded after the short request: it did not queue behind all chunks.
    assert marks["long_end"] - marks["short_end"] > 0.4 * (marks["long_end"] - marks["long_start"]), marks


def test_no_room_at_all_is_a_fast_503(inst):
    samples, _ = set_a_sequence(gap=1.0)
    short = read_16k_mono(shared_audio("setA/sr_english.wav"))  # 2.7 s
    options = DecodeOptions(beam_size=1)
    futures = [inst.queue.submit(short, options) for _ in range(inst.queue.max_pending)]
    started = time.monotonic()
    with pytest.raises(QueueFull):
        longform.transcribe_long(inst, samples, options)
    refused_after = time.monotonic() - started
    for future in futures:
        result_within(future, 120)
    assert refused_after < 0.5 * (time.monotonic() - started)  # before the queue ahead of it drained


# Joins that lose nothing ----------------------------------------------------------------------------

# Read without a pause (no punctuation): the chunker has to cut inside speech. Its content words occur once.
UNBROKEN = ("the quick brown fox jumps over the lazy dog while seven wizards quietly pack their bags "
            "and travel north across the frozen mountains toward a distant village where farmers grow "
            "pumpkins carrots and potatoes beside a river full of silver fish that glitter under the morning "
            "sun then the children run along the wooden bridge laughing loudly as their grandmother bakes fresh bread")


@pytest.fixture(scope="module")
def short_chunks(tmp_path_factory):
    """An instance that cuts at 10 s, so that half a minute of speech takes several cuts."""
    settings = load_settings(env={}, overrides={"max_queue": 4, "chunk_seconds": 10,
                                                "run_dir": str(tmp_path_factory.mktemp("run10"))})
    instance = ModelInstance(settings)
    instance.load_now()
    assert instance.ready, instance.error
    yield instance
    instance.queue.stop()


def test_a_word_across_a_cut_inside_speech_is_kept_once_and_none_is_lost(short_chunks):
    samples = espeak(UNBROKEN)
    chunks = longform.split(samples, 10, short_chunks.engine.word_timestamps)
    cuts = [c / SAMPLE_RATE for c in chunking.cuts(chunks)[:-1]]
    assert len(cuts) >= 2 and all(chunking.overlapping(chunks, i) for i in range(len(chunks)))  # all inside speech
    options = DecodeOptions(beam_size=short_chunks.settings.beam_size)
    whole = short_chunks.engine.transcribe(samples, replace(options, word_timestamps=True))
    chunked, _ = longform.transcribe_long(short_chunks, samples, options)
    reference, heard = normalize(UNBROKEN).split(), normalize(chunked.text).split()
    timed = [(normalize(w.word), w.start, w.end) for s in whole.segments for w in s.words]
    checked = []
    for cut in cuts:
        # The word the cut runs through, as the whole recording decoded in one piece timed it.
        word = next((w for w, start, end in timed if start < cut < end), None)
        if word is not None and reference.count(word) == 1:  # heard right there, and a word said once
            assert heard.count(word) == 1, (cut, word, chunked.text)
            checked.append(word)
    assert len(checked) >= 2, (cuts, timed)
    # Nothing lost or doubled anywhere else either: as many words as the whole recording decoded in one
    # piece, and no more missing or extra against the reference, give or take one. (Words heard
    # differently are not counted: a 10 s chunk gives the model less context than 30 s.)
    in_one, in_chunks = (jiwer.process_words(" ".join(reference), text) for text in (normalize(whole.text), " ".join(heard)))
    assert abs(len(heard) - len(normalize(whole.text).split())) <= 1, (whole.text, chunked.text)
    assert in_chunks.deletions <= in_one.deletions + 1 and in_chunks.insertions <= in_one.insertions + 1, (
        whole.text, chunked.text)
    assert not any(s.words for s in chunked.segments)  # the words were for the join: not asked for, not returned
    starts = [s.start for s in chunked.segments]
    assert starts == sorted(starts)


def test_a_quiet_stretch_vad_misses_is_decoded_all_the_same(inst):
    # JFK spoken out loud, 25 s of silence, then JFK again 60 dB quieter: Silero VAD hears nothing in
    # it, Whisper (which scales each window to its own loudest) hears every word.
    jfk = read_16k_mono(shared_audio("setA/jfk.flac"))
    quiet = (0.001 * jfk).astype(np.float32)
    samples = np.concatenate([jfk, np.zeros(25 * SAMPLE_RATE, np.float32), quiet])
    assert not vad.speech_stretches(quiet)
    chunks = longform.split(samples, inst.settings.chunk_seconds)
    assert len(chunks) == 2 and not chunks[1].speech  # the chunk VAD calls silent
    transcript, _ = longform.transcribe_long(inst, samples, DecodeOptions(beam_size=inst.settings.beam_size))
    late = " ".join(s.text for s in transcript.segments if s.start >= chunks[1].start / SAMPLE_RATE)
    assert wer([JFK_REFERENCE], [late]) <= 0.2, transcript.text
    assert wer([f"{JFK_REFERENCE} {JFK_REFERENCE}"], [transcript.text]) <= 0.2


# The scheduler's rules, on lanes that are plain functions (pure policy) -----------------------------

def text(index: int) -> Transcript:
    return Transcript(f"chunk {index}", "en", 1.0)


def test_a_busy_lane_gives_its_chunk_back_to_the_others():
    calls: dict[str, list[int]] = {"local": [], "sibling": []}

    def local(i):
        calls["local"].append(i)
        time.sleep(0.01)
        return text(i)

    def sibling(i):
        calls["sibling"].append(i)
        if len(calls["sibling"]) > 2:
            raise Busy("full")
        return text(i)

    lanes = [longform.Lane("local", 1, local, patient=True), longform.Lane("sibling", 1, sibling)]
    done = longform.decode_chunks(range(10), lanes, time.monotonic() + 30)
    assert sorted(done) == list(range(10)) and all(done[i][0].text == f"chunk {i}" for i in range(10))
    assert {lane for _, lane in done.values()} == {"local", "sibling"}
    assert sum(1 for _, lane in done.values() if lane == "sibling") == 2  # not asked again once busy


def test_a_lane_never_holds_more_than_its_slots():
    active, peak, lock = [0], [0], threading.Lock()

    def decode(i):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        with lock:
            active[0] -= 1
        return text(i)

    done = longform.decode_chunks(range(12), [longform.Lane("gpu", 3, decode)], time.monotonic() + 30)
    assert len(done) == 12 and peak[0] == 3


def test_a_patient_lane_retries_only_while_the_request_holds_work():
    attempts = [0]

    def full(i):
        attempts[0] += 1
        raise Busy("full")

    done = longform.decode_chunks(range(3), [longform.Lane("local", 1, full, patient=True)], time.monotonic() + 30)
    assert done == {} and attempts[0] == 1  # nothing held: give up at once (-> 503), no waiting for a slot

    state = {"n": 0}

    def full_once_after_first(i):
        state["n"] += 1
        if state["n"] == 2:
            raise Busy("full for a moment")
        return text(i)

    done = longform.decode_chunks(range(3), [longform.Lane("local", 1, full_once_after_first, patient=True)],
                                  time.monotonic() + 30)
    assert sorted(done) == [0, 1, 2] and state["n"] == 4


def test_errors_stop_the_others_and_cancelling_stops_taking_chunks():
    def broken(i):
        if i == 2:
            raise ValueError("bad options")
        return text(i)

    with pytest.raises(ValueError, match="bad options"):
        longform.decode_chunks(range(6), [longform.Lane("local", 1, broken)], time.monotonic() + 30)
    taken = []

    def record(i):
        taken.append(i)
        return text(i)

    done = longform.decode_chunks(range(6), [longform.Lane("local", 1, record)], time.monotonic() + 30,
                                  cancelled=lambda: len(taken) >= 2)
    assert sorted(done) == [0, 1] and taken == [0, 1]


def test_lanes_decode_the_first_chunks_while_the_rest_are_still_being_planned():
    taken = threading.Event()

    def planned():  # as VAD would: the first chunk long before the last
        yield 0
        assert taken.wait(5), "no lane took chunk 0 before the rest were planned"
        for i in range(1, 6):
            time.sleep(0.05)  # lanes with nothing to do wait for the plan instead of giving up
            yield i

    def decode(i):
        taken.set()
        return text(i)

    lanes = [longform.Lane("local", 1, decode, patient=True), longform.Lane("sibling", 1, decode)]
    done = longform.decode_chunks(planned(), lanes, time.monotonic() + 30)
    assert sorted(done) == list(range(6)) and all(done[i][0].text == f"chunk {i}" for i in range(6))


def test_planning_that_fails_stops_the_lanes_and_is_raised():
    def planned():
        yield 0
        yield 1
        raise RuntimeError("VAD failed")

    with pytest.raises(RuntimeError, match="VAD failed"):
        longform.decode_chunks(planned(), [longform.Lane("local", 2, text, patient=True)], time.monotonic() + 30)
    # no lane left waiting for chunks that never come
    assert not [t for t in threading.enumerate() if t.name == "chunks-local"]


def test_published_chunks_know_their_neighbour():
    chunks: list = []
    seen = []

    def planned():
        for k in range(3):
            yield Chunk(k * 10, k * 10 + 12, True, overlaps_next=k < 2)  # each overlaps the next, as planned
            seen.append(len(chunks))

    for index in longform.published(planned(), chunks):
        # The neighbour it overlaps is known; the last one (cut in no speech) goes at once.
        assert index + 1 < len(chunks) or (index == 2 and seen == [1, 2])
        assert longform.chunk_options(DecodeOptions(), chunks, index).word_timestamps  # it overlaps one
    assert len(chunks) == 3


def test_chunks_are_spans_only_where_the_engine_conditions_on_previous_text():
    def longest(one_language=True, **overrides):
        return longform.longest_chunk(load_settings(env={}, overrides=overrides), one_language)
    assert longest() == 120 and longest(span_seconds=300) == 300
    assert longest(max_audio_seconds=100) == 100 and longest(max_audio_seconds=20) == 30   # what an instance takes
    assert longest(condition_on_previous_text=False) == longest(span_seconds=0) == 30
    assert longest(engine="transformers") == 30 and longest(chunk_seconds=20, span_seconds=0) == 20
    # A language to detect on a multilingual model: chunks of one window, each detecting its own.
    assert longest(one_language=False) == 30


def test_spans_are_cut_in_pauses_listening_only_near_each_cut(monkeypatch):
    # About 150 s of sentences with 0.8 s pauses: four spans of about 37 s for two lanes (at most 60 s).
    sentences = ["The quick brown fox jumps over the lazy dog.", "A long recording is cut into equal parts.",
                 "Each part is decoded window after window.", "Two lanes decode two parts at the same time.",
                 "Nobody should wait for the whole file to be heard."]
    samples, _ = speech_with_pauses(*sentences * 10, pause=0.8)
    whole = vad.speech_stretches(samples)
    heard: list[int] = []
    real = vad.speech_stretches
    monkeypatch.setattr(vad, "speech_stretches", lambda audio, *a, **k: heard.append(len(audio)) or real(audio, *a, **k))
    chunks = longform.split(samples, 60, True, parts=2)
    assert len(chunks) == 4 and chunks[0].start == 0 and chunks[-1].end == len(samples)
    assert all(a.end == b.start for a, b in zip(chunks, chunks[1:]))
    share = len(samples) / 4
    for chunk in chunks[:-1]:
        assert abs(chunk.end - (chunk.start + share)) < 8 * SAMPLE_RATE, chunks     # its share, to within a sentence
        assert not any(s["start"] < chunk.end < s["end"] for s in whole), chunk.end  # in a pause the whole scan hears
    # Silero heard the audio around the three cuts (each 10 s either side, and about 2 s before to settle), not
    # the whole recording.
    assert 0 < sum(heard) <= 3 * 23 * SAMPLE_RATE < len(samples) / 2, (heard, len(samples))


def test_a_chunk_cut_in_a_pause_is_published_before_the_next_is_planned():
    chunks: list = []
    published = []
    for index in longform.published((Chunk(k * 10, k * 10 + 10, True) for k in range(3)), chunks):
        published.append((index, len(chunks)))
        options = longform.chunk_options(DecodeOptions(), chunks, index)
        assert options.ends_in_pause and not options.word_timestamps
    assert published == [(0, 1), (1, 2), (2, 3)]      # each as soon as it was planned


def test_on_a_batching_instance_a_request_s_chunks_go_in_one_batch(tmp_path):
    """The GPU case, on CPU: with max_batch 2 a long request holds two slots and its chunks (of one
    window) are decoded two at a time in one batched engine call, with the same words as one at a time."""
    settings = load_settings(env={}, overrides={"max_queue": 4, "max_batch": 2, "max_wait_ms": 100,
                                                "span_seconds": 0, "run_dir": str(tmp_path)})
    batching = ModelInstance(settings)
    batching.load_now()
    sizes: list[int] = []
    batching.queue.observer = lambda size, waits: sizes.append(size)
    try:
        samples, places = set_a_sequence(gap=1.0)
        options = DecodeOptions(beam_size=settings.beam_size)
        transcript, placed = longform.transcribe_long(batching, samples, options)
    finally:
        batching.queue.stop()
    assert settings.chunk_slots(batching.queue.max_batch) == 2 and max(sizes) == 2
    assert sum(sizes) == placed[batching.id] >= 3
    reference = " ".join(r for *_, r in places)
    assert wer([reference], [transcript.text]) <= 0.05


def test_job_progress_counts_every_chunk_against_all_chunks():
    # A VAD-shortened timeline (40 s of speech kept from a 100 s recording), cut inside speech: the
    # chunks overlap, and one of them is silent to VAD (decoded all the same). Each chunk's share is
    # its length against all chunks', so the shares reach the recording's 100 s when the last is done.
    chunks = [Chunk(0, 11 * SAMPLE_RATE, True), Chunk(8 * SAMPLE_RATE, 21 * SAMPLE_RATE, False),
              Chunk(21 * SAMPLE_RATE, 40 * SAMPLE_RATE, True)]
    shares = [longform.progress_seconds(chunks, i, 100.0) for i in range(3)]
    assert sum(shares) == pytest.approx(100.0)
    assert shares == pytest.approx([100 * 11 / 43, 100 * 13 / 43, 100 * 19 / 43])
