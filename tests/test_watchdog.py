"""The per-call deadline, on a real InferenceQueue with an engine whose call can be made to hang."""
import threading
import time

import numpy as np

from app.engines.base import DecodeOptions, Transcript
from app.runtime.queue import InferenceQueue
from app.runtime.stuck_calls import Watchdog


class _HangingEngine:
    """Finishes at once unless told to hang: stands for a call stuck in native code."""

    def __init__(self):
        self.hang = threading.Event()
        self.release = threading.Event()

    def transcribe(self, audio, options):
        if self.hang.is_set():
            self.release.wait(30)
        return Transcript(text="ok", language="en", duration=len(audio) / 16000)

    def transcribe_batch(self, audios, options):
        return [self.transcribe(a, o) for a, o in zip(audios, options)]


def _watch(engine, limit):
    queue = InferenceQueue(max_pending=4)
    queue.start(engine)
    stuck = []
    watchdog = Watchdog(queue, limit_seconds=limit, on_stuck=stuck.append, interval=0.05)
    watchdog.start()
    return queue, watchdog, stuck


def test_a_stuck_call_trips_the_watchdog_after_its_deadline():
    engine = _HangingEngine()
    engine.hang.set()
    queue, watchdog, stuck = _watch(engine, limit=0.3)
    started = time.monotonic()
    future = queue.submit(np.zeros(16000, np.float32), DecodeOptions())
    while not stuck and time.monotonic() - started < 5:
        time.sleep(0.02)
    assert stuck and stuck[0] > 0.3 and queue.busy_since is not None and not future.done()
    engine.release.set()
    assert future.result(timeout=5).text == "ok"
    assert queue.busy_since is None


def test_calls_within_the_deadline_do_not_trip_it():
    engine = _HangingEngine()
    queue, watchdog, stuck = _watch(engine, limit=0.3)
    for _ in range(20):
        queue.submit(np.zeros(1600, np.float32), DecodeOptions()).result(timeout=5)
    time.sleep(0.4)
    watchdog.stop()
    assert stuck == [] and queue.busy_since is None


def test_the_deadline_follows_the_audio_of_the_call_and_is_capped_by_the_request_timeout():
    """The old limit, max_inference_seconds x max_batch, was 2640 s on a GPU with the defaults: a stuck
    call held the instance for 44 minutes, long after every request of it had been answered 504."""
    from app.config import DECODE_START_SECONDS, load_settings

    settings = load_settings(env={}, overrides={"max_batch": 8})
    engine = _HangingEngine()
    engine.hang.set()
    queue = InferenceQueue(max_pending=8, max_batch=8)
    queue.start(engine)
    watchdog = Watchdog(queue, settings.request_timeout_seconds,
                        seconds_per_audio_second=settings.slowest_realtime_factor, base_seconds=DECODE_START_SECONDS)
    try:
        queue.submit(np.zeros(16000 * 20, np.float32), DecodeOptions())
        deadline = time.monotonic() + 5
        while queue.busy_since is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queue.busy_audio_seconds == 20
        assert watchdog.deadline() == 30 + 0.5 * 20                    # 40 s for a 20 s clip
        queue.busy_audio_seconds = 8 * settings.max_audio_seconds      # a batch of 8 of the longest
        assert watchdog.deadline() == settings.request_timeout_seconds  # 660 s, not 2640 s
        assert settings.request_timeout_seconds < settings.max_inference_seconds * 8
    finally:
        engine.release.set()


class _GatedEngine:
    """Each call after ``hold()`` waits for its own ``release()``: calls that stay stuck until the test
    lets them go, one by one. Enough of the engine interface for an instance to load it."""

    def __init__(self):
        import queue

        self.gates: queue.Queue = queue.Queue()
        self.holding = False

    def transcribe_batch(self, audios, options):
        if self.holding:
            self.gates.get(timeout=30)
        return [Transcript(text="ok", language="en", duration=len(a) / 16000) for a in audios]

    def transcribe(self, audio, options):
        return self.transcribe_batch([audio], [options])[0]


def _busy_with(queue, audio_seconds: float) -> None:
    deadline = time.monotonic() + 10
    while not (queue.busy_since is not None and queue.busy_audio_seconds == audio_seconds):
        assert time.monotonic() < deadline, f"no engine call on {audio_seconds} s of audio"
        time.sleep(0.01)


def test_an_instance_on_cuda_bounds_a_call_by_its_audio_and_by_the_request_timeout(monkeypatch):
    """The watchdog a GPU instance starts (max_batch 8) gives a call the time its audio needs, never
    more than the request timeout: the old limit, max_inference_seconds x max_batch, kept a stuck
    batch's instance past every request's timeout (2640 s with the defaults)."""
    import app.runtime.instance
    from app.config import DECODE_START_SECONDS, load_settings
    from app.runtime.instance import ModelInstance
    from fake_nvml import FakeGpu, FakeNvml, cuda_sees

    fake = FakeNvml([FakeGpu("NVIDIA L4", 23_034)]).install(monkeypatch)
    cuda_sees(monkeypatch, fake.gpus[0])
    engine = _GatedEngine()
    monkeypatch.setattr(app.runtime.instance, "load_engine", lambda *args, **kwargs: engine)
    watchdogs, stuck = [], []

    class RecordingWatchdog(Watchdog):     # the instance's own watchdog; a trip is recorded, not fatal
        def __init__(self, *args, **kwargs):
            super().__init__(*args, on_stuck=stuck.append, **kwargs)
            watchdogs.append(self)

    monkeypatch.setattr(app.runtime.instance, "Watchdog", RecordingWatchdog)
    # 60 s clips keep a full batch of the longest small in memory; the rule is the same at 600 s.
    settings = load_settings(env={}, overrides={"device": "cuda", "gpu_uuid": fake.gpus[0].uuid, "max_batch": 8,
                                                "max_queue": 16, "max_audio_seconds": 60})
    inst = ModelInstance(settings)
    inst.load_now()
    assert inst.state == "ready", inst.error
    (watchdog,) = watchdogs
    assert inst.queue.max_batch == 8
    engine.holding = True
    try:
        inst.queue.submit(np.zeros(16000 * 20, np.float32), DecodeOptions())
        _busy_with(inst.queue, 20)
        # A 20 s clip: decoding's start-up plus the slowest rate for 20 s of audio.
        assert watchdog.deadline() == DECODE_START_SECONDS + settings.slowest_realtime_factor * 20
        assert watchdog.deadline() < settings.request_timeout_seconds
        longest = [inst.queue.submit(np.zeros(16000 * 60, np.float32), DecodeOptions()) for _ in range(8)]
        engine.gates.put(True)                          # the 20 s call ends; the batch of 8 starts
        _busy_with(inst.queue, 8 * 60)
        # 8 x 60 s at the slowest rate would take longer than a request may wait: the deadline is capped
        # there (uncapped, it would be the estimate, and this would fail).
        assert watchdog.deadline() == settings.request_timeout_seconds      # 120 s here
        assert stuck == []
    finally:
        for _ in range(9):
            engine.gates.put(True)
        watchdog.stop()
        inst.queue.stop()
    assert all(f.result(timeout=5).text == "ok" for f in longest)
