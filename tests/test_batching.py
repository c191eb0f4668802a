"""Dynamic batching: the queue gathers concurrent requests into one engine call, and a batched decode
gives exactly the transcripts one-by-one decoding gives, with the real model on the real clips."""
import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from app.config import load_settings
from app.engines import load_engine
from app.engines.base import DecodeOptions, Transcript
from app.engines.models import embedded_ct2_dir, resolve_model
from app.runtime.queue import InferenceQueue, QueueFull
from faster_whisper.tokenizer import Tokenizer
from support import shared_audio, english_set_a, read_16k_mono, wer


# -- the queue, with a scripted engine ------------------------------------------------------------

class ScriptedEngine:
    """Records every call; the first call can be held until released, so jobs pile up behind it."""

    def __init__(self, hold_first: bool = False, bad: float | None = None):
        self.calls: list[int] = []          # clips per call: 1 for transcribe, n for transcribe_batch
        self.batched: list[int] = []        # sizes of transcribe_batch calls only
        self.bad = bad                      # a clip whose first sample is this fails
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def _one(self, audio: np.ndarray) -> Transcript:
        if self.bad is not None and audio[0] == self.bad:
            raise ValueError("bad clip")
        return Transcript(text=f"clip {audio[0]:g}", language="en", duration=len(audio) / 16000)

    def transcribe(self, audio, options):
        self.calls.append(1)
        self.started.set()
        self.release.wait(10)
        return self._one(audio)

    def transcribe_batch(self, audios, options):
        self.calls.append(len(audios))
        self.batched.append(len(audios))
        self.started.set()
        self.release.wait(10)
        return [self._one(a) for a in audios]

    def detect_language(self, audios):
        self.calls.append(-len(audios))     # negative: a language detection call
        return [("en", float(a[0])) for a in audios]


def clip(n: float) -> np.ndarray:
    return np.full(1600, n, np.float32)


@pytest.fixture
def started_queue():
    queues = []

    def start(engine, **kwargs):
        q = InferenceQueue(kwargs.pop("max_pending", 8), **kwargs)
        q.start(engine)
        queues.append(q)
        return q

    yield start
    for q in queues:
        q.stop()


def test_jobs_submitted_together_run_as_one_batch(started_queue):
    engine = ScriptedEngine(hold_first=True)
    seen = []
    q = started_queue(engine, max_batch=4, max_wait_ms=50, observer=lambda size, waits: seen.append((size, waits)))
    first = q.submit(clip(0), DecodeOptions())
    assert engine.started.wait(5)                 # the first job runs alone: nothing else was queued
    others = [q.submit(clip(i), DecodeOptions()) for i in range(1, 6)]
    assert q.pending == 6 and q.in_flight == 1 and q.waiting == 5
    engine.release.set()
    results = [f.result(10) for f in [first, *others]]
    assert [r.text for r in results] == [f"clip {i}" for i in range(6)]  # each job gets its own answer
    assert engine.calls == [1, 4, 1] and engine.batched == [4]
    assert [size for size, _ in seen] == [1, 4, 1]
    assert all(len(waits) == size and min(waits) >= 0 for size, waits in seen)
    assert q.pending == 0 and q.in_flight == 0


def test_a_lone_job_waits_at_most_max_wait(started_queue):
    engine = ScriptedEngine()
    q = started_queue(engine, max_batch=8, max_wait_ms=300)
    t0 = time.monotonic()
    assert q.submit(clip(1), DecodeOptions()).result(5).text == "clip 1"
    assert time.monotonic() - t0 < 2
    assert engine.calls == [1]
    # Jobs arriving within the wait join the first one's batch.
    futures = [q.submit(clip(2), DecodeOptions())]
    time.sleep(0.005)
    futures.append(q.submit(clip(3), DecodeOptions()))
    assert [f.result(5).text for f in futures] == ["clip 2", "clip 3"]
    assert engine.batched == [2]


def test_max_batch_one_never_batches(started_queue):
    engine = ScriptedEngine(hold_first=True)
    q = started_queue(engine, max_batch=1, max_wait_ms=50)
    futures = [q.submit(clip(i), DecodeOptions()) for i in range(4)]
    engine.release.set()
    assert [f.result(5).text for f in futures] == [f"clip {i}" for i in range(4)]
    assert engine.calls == [1, 1, 1, 1] and engine.batched == []


def test_low_priority_jobs_wait_behind_jobs_submitted_after_them(started_queue):
    """A live stream's provisional decodes never hold up a turn's final decode or a file."""
    engine = ScriptedEngine(hold_first=True)
    q = started_queue(engine, max_batch=1)
    first = q.submit(clip(0), DecodeOptions())
    assert engine.started.wait(5)
    order = []
    futures = [q.submit(clip(1), DecodeOptions(), low_priority=True), q.submit(clip(2), DecodeOptions(), low_priority=True),
               q.submit(clip(3), DecodeOptions()), q.submit(clip(4), DecodeOptions())]
    for f in futures:
        f.add_done_callback(lambda f: order.append(f.result().text))
    engine.release.set()
    assert first.result(5).text == "clip 0" and all(f.result(5) for f in futures)
    assert order == ["clip 3", "clip 4", "clip 1", "clip 2"]


def test_a_bad_clip_fails_only_its_own_request(started_queue):
    engine = ScriptedEngine(hold_first=True, bad=2)
    q = started_queue(engine, max_batch=4, max_wait_ms=50)
    first = q.submit(clip(0), DecodeOptions())
    assert engine.started.wait(5)
    futures = [q.submit(clip(i), DecodeOptions()) for i in (1, 2, 3)]
    engine.release.set()
    assert first.result(5).text == "clip 0"
    assert futures[0].result(5).text == "clip 1" and futures[2].result(5).text == "clip 3"
    with pytest.raises(ValueError, match="bad clip"):
        futures[1].result(5)
    assert engine.batched == [3]                  # the batch failed, then each clip ran alone
    assert engine.calls == [1, 3, 1, 1, 1]
    assert q.pending == 0


def test_language_detection_shares_the_queue_in_its_own_batched_call(started_queue):
    engine = ScriptedEngine(hold_first=True)
    q = started_queue(engine, max_batch=8, max_wait_ms=50)
    first = q.submit(clip(0), DecodeOptions())
    assert engine.started.wait(5)
    mixed = [q.submit(clip(1), DecodeOptions()), q.submit_language_detection(clip(0.5)),
             q.submit(clip(2), DecodeOptions()), q.submit_language_detection(clip(0.25))]
    assert q.pending == 5
    engine.release.set()
    assert first.result(5).text == "clip 0"
    assert [f.result(5) for f in mixed] == [Transcript("clip 1", "en", 0.1), ("en", 0.5),
                                           Transcript("clip 2", "en", 0.1), ("en", 0.25)]
    assert engine.calls == [1, 2, -2] and q.pending == 0  # one call per kind, each answer to its own job


def test_queue_full_is_refused_at_once(started_queue):
    engine = ScriptedEngine(hold_first=True)
    q = started_queue(engine, max_pending=3, max_batch=4, max_wait_ms=10)
    assert q.max_batch == 3                        # a batch never holds more than the queue
    futures = [q.submit(clip(i), DecodeOptions()) for i in range(3)]
    t0 = time.monotonic()
    with pytest.raises(QueueFull):
        q.submit(clip(9), DecodeOptions())
    assert time.monotonic() - t0 < 0.1
    engine.release.set()
    assert len([f.result(5) for f in futures]) == 3
    assert q.submit(clip(4), DecodeOptions()).result(5).text == "clip 4"  # room again


def test_cancelled_jobs_are_skipped_and_free_their_slot(started_queue):
    engine = ScriptedEngine(hold_first=True)
    q = started_queue(engine, max_pending=4, max_batch=4, max_wait_ms=10)
    first = q.submit(clip(0), DecodeOptions())
    assert engine.started.wait(5)
    waiting = [q.submit(clip(i), DecodeOptions()) for i in (1, 2, 3)]
    assert waiting[0].cancel() and waiting[2].cancel()   # requests that gave up before their turn
    engine.release.set()
    assert first.result(5).text == "clip 0" and waiting[1].result(5).text == "clip 2"
    with pytest.raises(CancelledError):
        waiting[0].result(0)
    assert engine.calls == [1, 1]                  # the cancelled clips never reached the engine
    assert q.pending == 0


def test_batch_metrics_reach_prometheus(started_queue):
    from types import SimpleNamespace

    from flask import Flask
    from prometheus_client.parser import text_string_to_metric_families

    from app.runtime import metrics

    engine = ScriptedEngine(hold_first=True)
    q = started_queue(engine, max_batch=4, max_wait_ms=10)
    instance = SimpleNamespace(queue=q, device="cpu", ready=True, load_seconds=1.0, requests_in_flight=0, streams_open=0,
                               state="ready", settings=load_settings(env={}, overrides={"jobs": False}))
    app = Flask(__name__)
    metrics.init_app(app, instance)
    futures = [q.submit(clip(0), DecodeOptions())]
    assert engine.started.wait(5)
    futures += [q.submit(clip(i), DecodeOptions()) for i in (1, 2, 3)]
    engine.release.set()
    [f.result(5) for f in futures]
    samples = {s.name: s.value for family in text_string_to_metric_families(app.test_client().get("/metrics").text)
               for s in family.samples if not s.labels}
    assert samples["asr_batch_size_count"] == 2 and samples["asr_batch_size_sum"] == 4
    assert samples["asr_queue_wait_seconds_count"] == 4 and samples["asr_queue_wait_seconds_sum"] >= 0


class SteppedEngine:
    """A continuous engine (as vLLM): jobs begun one by one, each ending after as many steps (10 ms
    each) as its clip's value; with ``fail_holding`` set, a step over that many jobs raises once, as
    an engine that broke would."""

    continuous = True

    def __init__(self):
        self.left: dict = {}
        self.most_begun, self.abandoned = 0, 0
        self.fail_holding: int | None = None

    def begin(self, key, audio, options):
        if audio[0] < 0:
            raise ValueError("refused clip")
        self.left[key] = [int(audio[0]), audio]
        self.most_begun = max(self.most_begun, len(self.left))

    def step(self):
        time.sleep(0.01)
        if self.fail_holding is not None and len(self.left) >= self.fail_holding:
            self.fail_holding = None
            raise RuntimeError("engine broke")
        done = []
        for key, entry in list(self.left.items()):
            entry[0] -= 1
            if entry[0] <= 0:
                del self.left[key]
                done.append((key, True, Transcript(text=f"clip {entry[1][0]:g}", language="en", duration=0.1)))
        return done

    def abandon(self):
        self.abandoned += len(self.left)
        self.left = {}


def test_a_continuous_engine_answers_each_job_when_it_ends_and_survives_a_broken_step(started_queue):
    engine = SteppedEngine()
    q = started_queue(engine, max_pending=8, max_batch=3)
    futures = [q.submit(clip(n), DecodeOptions()) for n in (6, 1, 3, 2)]
    refused = q.submit(clip(-1), DecodeOptions())
    ended = []
    for f in futures:
        f.add_done_callback(lambda f: ended.append(f.result().text))
    assert [f.result(10).text for f in futures] == ["clip 6", "clip 1", "clip 3", "clip 2"]
    assert "refused clip" in str(refused.exception(10))            # a job the engine refuses fails alone
    assert ended[0] == "clip 1" and ended[-1] == "clip 6", ended   # each answered when it ends, not with its batch
    assert engine.most_begun == 3                                  # never more begun than max_batch
    assert q.pending == 0 and q.in_flight == 0
    # A step that raises fails every job begun, the engine drops them, and the queue serves on.
    engine.fail_holding = 2
    broken = [q.submit(clip(50), DecodeOptions()) for _ in range(2)]
    assert all("engine broke" in str(f.exception(10)) for f in broken)
    assert engine.abandoned == 2 and q.pending == 0 and q.in_flight == 0
    assert q.submit(clip(2), DecodeOptions()).result(10).text == "clip 2"


def test_batch_size_setting_is_chosen_per_device():
    settings = load_settings(env={})
    assert settings.batch_size("cpu") == 1 and settings.batch_size("cuda") == 8
    explicit = load_settings(env={"ASR_MAX_BATCH": "4", "ASR_MAX_WAIT_MS": "5"})
    assert explicit.batch_size("cpu") == 4 and explicit.max_wait_ms == 5
    assert load_settings(env={"ASR_MAX_BATCH": "32"}).batch_size("cuda") == 8  # capped by max_queue


# -- the real engines: batched transcripts equal one-by-one transcripts ---------------------------

@pytest.fixture(scope="module")
def set_a():
    return [read_16k_mono(shared_audio(r["file"])) for r in english_set_a()]


def test_ctranslate2_batched_equals_one_by_one(set_a):
    engine = load_engine("ctranslate2", str(embedded_ct2_dir()), "cpu", "int8", cpu_threads=1)
    # Set A, plus clips longer than a 30 s window: they take more lockstep rounds than the others, their
    # second window primed with the first one's text (faster-whisper's default conditioning), or not (the
    # last). Two clips with an initial prompt (their first window decodes in its own call: CTranslate2
    # wants the same prompt length across a batch), one with word timestamps (decoded on its own).
    clips = [*set_a, np.concatenate([set_a[0], set_a[6]]), np.concatenate(set_a[4:]), np.concatenate(set_a[3:])]
    options = [DecodeOptions(beam_size=5, initial_prompt="um so yeah we were like talking about it" if i in (1, 4) else "",
                             word_timestamps=i == 3, condition_on_previous_text=i != len(clips) - 1)
               for i in range(len(clips))]
    one_by_one = [engine.transcribe(a, o) for a, o in zip(clips, options)]
    generate, calls = engine._generate, []
    engine._generate = lambda encoded, prompts, *a, **k: calls.append(prompts) or generate(encoded, prompts, *a, **k)
    batched = engine.transcribe_batch(clips, options)
    assert batched == one_by_one                    # text, segments, words, times, language: all of it
    assert all(t.text for t in batched) and len(batched[-3].segments) > len(batched[0].segments)
    assert batched[3].segments[0].words and not batched[2].segments[0].words
    unprompted = engine.transcribe(clips[1], DecodeOptions(beam_size=5))
    assert batched[1].text != unprompted.text      # the prompt did reach the lockstep decode
    # So did the conditioning: the long clips' second windows primed with their first windows' words
    # (<|startofprev|>, that text), the last clip's with none. Whether that changes a word is up to the
    # CPU's int8 kernels (on set A's last five clips it does with oneDNN's, not with MKL's).
    tokenizer = Tokenizer(engine._model.hf_tokenizer, engine.multilingual, task="transcribe", language="en")
    primed = [tokenizer.decode([t for t in p[1:p.index(tokenizer.sot)] if t < tokenizer.eot]).strip()
              for prompts in calls for p in prompts if p[0] == tokenizer.sot_prev]
    for conditioned in batched[-3:-1]:
        assert any(len(said.split()) > 10 and conditioned.text.startswith(said) for said in primed), primed
    assert not any(said and batched[-1].text.startswith(said) for said in primed), primed


def test_ctranslate2_continues_a_prefix_and_returns_only_what_follows_it(set_a):
    """DecodeOptions.prefix, as a live stream hears a turn after the turns before it: two clips back to
    back, the first one's transcript as the prefix; the decode gives the second one's words only, and
    batched (prefixes of different lengths, a prompt, a clip without a prefix) as one by one."""
    engine = load_engine("ctranslate2", str(embedded_ct2_dir()), "cpu", "int8", cpu_threads=1)
    first, second = set_a[0], set_a[5]
    heard = engine.transcribe(first, DecodeOptions(beam_size=5)).text
    alone = engine.transcribe(second, DecodeOptions(beam_size=5)).text
    both = np.concatenate([first, second])
    options = [DecodeOptions(beam_size=5, prefix=heard),
               DecodeOptions(beam_size=5, prefix=" ".join(heard.split()[-6:])),
               DecodeOptions(beam_size=5),
               DecodeOptions(beam_size=5, prefix=heard, initial_prompt="um so yeah we were like talking about it")]
    one_by_one = [engine.transcribe(both, o) for o in options]
    generate, calls = engine._generate, []
    engine._generate = lambda encoded, prompts, *a, **k: calls.append(sorted(map(len, prompts))) or generate(encoded, prompts, *a, **k)
    batched = engine.transcribe_batch([both] * len(options), options)
    assert batched == one_by_one
    # Prefixes of different lengths share one beam search (CTranslate2 takes them so, word for word).
    assert any(len(lengths) >= 2 and lengths[0] != lengths[-1] for lengths in calls), calls
    for continued in (batched[0], batched[1], batched[3]):
        assert wer([alone], [continued.text]) <= 0.2, (alone, continued.text)
        assert len(continued.segments) == 1 and continued.segments[0].end == pytest.approx(len(both) / 16000, abs=0.02)
    assert wer([f"{heard} {alone}"], [batched[2].text]) <= 0.2, batched[2].text   # without one: both clips' words


def test_an_open_last_segment_is_kept_only_in_a_final_window():
    from app.engines.ctranslate2_engine import _open_segment, _split_by_timestamps

    ts = lambda seconds: 1000 + round(seconds / 0.02)  # noqa: E731 - timestamp tokens from 1000
    complete, paired, texted = [ts(0), 5, ts(2)], [ts(0), 5, ts(2), ts(2)], [ts(0), 5, ts(2), ts(2), 6, 7]
    assert _open_segment(complete, 1000) is None and _open_segment([5, 6], 1000) is None
    assert _open_segment(paired, 1000) == 3 and _open_segment(texted, 1000) == 3
    # Not final: the open segment is dropped and the next window starts at its timestamp (frame 200).
    assert _split_by_timestamps(texted, 1000, 0.0, 2500, 25.0, 0) == ([(0.0, 2.0, [ts(0), 5, ts(2)])], 200)
    # Final (the clip ends with this window): kept up to the window's end, and the clip is done.
    pieces, seek = _split_by_timestamps(texted, 1000, 10.0, 2500, 25.0, 0, final=True)
    assert pieces == [(10.0, 12.0, [ts(0), 5, ts(2)]), (12.0, 35.0, [ts(2), 6, 7])] and seek == 2500


def test_transformers_batched_equals_one_by_one(set_a, model_cache):
    model = resolve_model("transformers", "embedded", model_cache)
    engine = load_engine("transformers", model, "cpu", "float32", cpu_threads=1)
    clips = sorted(set_a, key=len)[:3]              # the shortest: torch beam search on CPU is slow
    options = [DecodeOptions(beam_size=5)] * len(clips)
    one_by_one = [engine.transcribe(a, o) for a, o in zip(clips, options)]
    assert engine.transcribe_batch(clips, options) == one_by_one


def test_transformers_long_clips_batch_like_one_by_one(set_a, model_cache):
    """Clips over 30 s go through generate()'s long-form decoding together, window by window."""
    model = resolve_model("transformers", "embedded", model_cache)
    engine = load_engine("transformers", model, "cpu", "float32", cpu_threads=1)
    clips = [np.concatenate(set_a[:6]), np.concatenate(set_a[3:])]
    assert all(len(c) > 30 * 16_000 for c in clips)
    options = [DecodeOptions(beam_size=1)] * 2
    one_by_one = [engine.transcribe(a, o) for a, o in zip(clips, options)]
    batched = engine.transcribe_batch(clips, options)
    assert batched == one_by_one and all(t.segments[-1].end > 27 for t in batched)  # to their ends
