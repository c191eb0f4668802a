"""The per-call deadline: an engine call that outlives the longest allowed inference ends the worker.

A request already stops waiting at its own deadline (504), but the engine call it started keeps the
instance's only inference thread, and a call stuck in native code cannot be interrupted from Python.
Ending the worker process is what frees the slot: gunicorn starts a fresh worker (which loads the
model again, /ready 503 meanwhile) and nginx retries the requests the old one held on another instance.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from app.runtime.queue import InferenceQueue

log = logging.getLogger(__name__)

EXIT_STUCK = 70  # EX_SOFTWARE; not gunicorn's boot-error code, so the master starts a new worker


def exit_worker(elapsed: float) -> None:
    log.critical("an engine call has run for %.0f s, past its deadline: ending this worker", elapsed)
    logging.shutdown()
    os._exit(EXIT_STUCK)


class Watchdog:
    """Ends the worker when one engine call runs past its deadline.

    The deadline is ``limit_seconds`` (the request timeout: past it, every request of the call has
    already been answered 504, so nobody waits for the call any more); with
    ``seconds_per_audio_second``, it is tighter: ``base_seconds`` plus that rate times the audio the
    call holds, so a call on a few short clips is not given the time of a batch of the longest ones.
    """

    def __init__(self, queue: InferenceQueue, limit_seconds: float,
                 on_stuck: Callable[[float], None] = exit_worker, interval: float = 1.0,
                 seconds_per_audio_second: float | None = None, base_seconds: float = 0.0):
        self.queue, self.limit, self.on_stuck, self.interval = queue, limit_seconds, on_stuck, interval
        self.rate, self.base = seconds_per_audio_second, base_seconds
        self._stop = threading.Event()

    def deadline(self) -> float:
        """Seconds the engine call in progress may run."""
        if self.rate is None:
            return self.limit
        return min(self.limit, self.base + self.rate * self.queue.busy_audio_seconds)

    def start(self) -> None:
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            since = self.queue.busy_since
            if since is not None and time.monotonic() - since > self.deadline():
                self.on_stuck(time.monotonic() - since)
                return
