"""The one place where requests wait for the model: a bounded queue and one inference thread.

Request threads never touch the engine. They submit a job and wait on its future; when the queue
already holds ``max_pending`` jobs (running + waiting) the submit is refused at once, so overload
becomes a fast 503 instead of a pile of blocked threads. Depth and in-flight counts are plain
attributes the probes and metrics read.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from app.engines.base import DecodeOptions, Engine, Transcript


class QueueFull(Exception):
    """Raised by ``submit`` when the instance already holds as many requests as it may."""


@dataclass
class _Job:
    audio: np.ndarray
    options: DecodeOptions
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)


class InferenceQueue:
    def __init__(self, max_pending: int):
        self.max_pending = max_pending
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0          # waiting + running
        self._running = 0
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def in_flight(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._pending - self._running

    def start(self, engine: Engine) -> None:
        self._thread = threading.Thread(target=self._run, args=(engine,), name="inference", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, audio: np.ndarray, options: DecodeOptions) -> Future:
        with self._lock:
            if self._pending >= self.max_pending:
                raise QueueFull(f"{self._pending} requests already queued (limit {self.max_pending})")
            self._pending += 1
        job = _Job(audio, options)
        self._jobs.put(job)
        return job.future

    def _run(self, engine: Engine) -> None:
        while (job := self._jobs.get()) is not None:
            # A request that gave up (deadline passed) cancelled its future: skip its work.
            if job.future.set_running_or_notify_cancel():
                self._running += 1
                try:
                    job.future.set_result(engine.transcribe(job.audio, job.options))
                except BaseException as e:  # the request thread reports it; this thread lives on
                    job.future.set_exception(e)
                finally:
                    self._running -= 1
            with self._lock:
                self._pending -= 1


def result_within(future: Future, timeout: float) -> Transcript:
    """Wait for a job; on timeout cancel it if it has not started, so it frees its slot."""
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        future.cancel()
        raise
