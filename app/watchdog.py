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

from app.queue import InferenceQueue

log = logging.getLogger(__name__)

EXIT_STUCK = 70  # EX_SOFTWARE; not gunicorn's boot-error code, so the master starts a new worker


def exit_worker(elapsed: float) -> None:
    log.critical("an engine call has run for %.0f s, past its deadline: ending this worker", elapsed)
    logging.shutdown()
    os._exit(EXIT_STUCK)


class Watchdog:
    def __init__(self, queue: InferenceQueue, limit_seconds: float,
                 on_stuck: Callable[[float], None] = exit_worker, interval: float = 1.0):
        self.queue, self.limit, self.on_stuck, self.interval = queue, limit_seconds, on_stuck, interval
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            since = self.queue.busy_since
            if since is not None and time.monotonic() - since > self.limit:
                self.on_stuck(time.monotonic() - since)
                return
