"""The per-call deadline, on a real InferenceQueue with an engine whose call can be made to hang."""
import threading
import time

import numpy as np

from app.engines.base import DecodeOptions, Transcript
from app.queue import InferenceQueue
from app.watchdog import Watchdog


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
