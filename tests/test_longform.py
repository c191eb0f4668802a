"""Long recordings cut at pauses and decoded chunk by chunk (app/longform.py): the same words as
window-after-window decoding on real speech, fair queueing next to short requests, a fast 503 when
there is no room, and the scheduler's rules for lanes that are busy, fail or are cancelled."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from app import longform
from app.config import load_settings
from app.engines.base import SAMPLE_RATE, DecodeOptions, Transcript
from app.instance import ModelInstance
from app.peers import Busy
from app.queue import QueueFull, result_within
from support import SPEECH, english_set_a, read_16k_mono, set_a_sequence, wer


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    settings = load_settings(env={}, overrides={"max_queue": 4, "run_dir": str(tmp_path_factory.mktemp("run"))})
    instance = ModelInstance(settings)
    instance.load_now()
    assert instance.ready, instance.error
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
    whole_wer, chunked_wer = wer([reference], [whole.text]), wer([reference], [chunked.text])
    assert chunked_wer <= whole_wer + 0.005, (whole_wer, chunked_wer)
    assert placed == {inst.id: placed[inst.id]} and placed[inst.id] >= 5  # fanout finds no siblings here
    # Absolute times, in order, within the audio; the last words near its end.
    starts = [s.start for s in chunked.segments]
    assert starts == sorted(starts) and all(s.end <= duration + 0.5 for s in chunked.segments)
    assert chunked.segments[-1].end > duration - 10 and chunked.duration == pytest.approx(duration)


def test_a_short_request_waits_for_one_chunk_not_the_whole_recording(inst):
    samples, _ = set_a_sequence(gap=1.0)  # about 70 s: 3-4 chunks
    options = DecodeOptions(beam_size=inst.settings.beam_size)
    marks: dict[str, float] = {}

    def long_request():
        marks["long_start"] = time.monotonic()
        longform.transcribe_long(inst, samples, options)
        marks["long_end"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.monotonic() + 60
    while inst.queue.in_flight == 0 and time.monotonic() < deadline:  # the first chunk is decoding
        time.sleep(0.01)
    short = read_16k_mono(SPEECH / "setA" / "jfk.flac")
    result_within(inst.queue.submit(short, options), 120)
    marks["short_end"] = time.monotonic()
    thread.join(timeout=300)
    assert marks["short_end"] < marks["long_end"]
    # Most of the recording was decoded after the short request: it did not queue behind all chunks.
    assert marks["long_end"] - marks["short_end"] > 0.4 * (marks["long_end"] - marks["long_start"]), marks


def test_no_room_at_all_is_a_fast_503(inst):
    samples, _ = set_a_sequence(gap=1.0)
    short = read_16k_mono(SPEECH / "setA" / "sr_english.wav")  # 2.7 s
    options = DecodeOptions(beam_size=1)
    futures = [inst.queue.submit(short, options) for _ in range(inst.queue.max_pending)]
    started = time.monotonic()
    with pytest.raises(QueueFull):
        longform.transcribe_long(inst, samples, options)
    refused_after = time.monotonic() - started
    for future in futures:
        result_within(future, 120)
    assert refused_after < 0.5 * (time.monotonic() - started)  # before the queue ahead of it drained


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


def test_on_a_batching_instance_a_request_s_chunks_go_in_one_batch(tmp_path):
    """The GPU case, on CPU: with max_batch 2 a long request holds two slots and its chunks are
    decoded two at a time in one batched engine call, with the same words as one at a time."""
    settings = load_settings(env={}, overrides={"max_queue": 4, "max_batch": 2, "max_wait_ms": 100,
                                                "run_dir": str(tmp_path)})
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
