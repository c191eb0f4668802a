"""The one place where requests wait for the model: a bounded queue and one inference thread.

Request threads never touch the engine. They submit a job and wait on its future; when the queue
already holds ``max_pending`` jobs (running + waiting) the submit is refused at once, so overload
becomes a fast 503 instead of a pile of blocked threads. Depth and in-flight counts are plain
attributes the probes and metrics read.

Two kinds of job share the queue: transcription (``submit``) and language detection
(``submit_language_detection``). Dynamic batching: the inference thread takes up to ``max_batch``
waiting jobs at once, waiting at most ``max_wait_ms`` after the first of them arrived for more to
come, and runs each kind through one batched engine call (``transcribe_batch``,
``detect_language``). A job that already waited that long (the thread was busy) is never held back
further. An engine that schedules its own batch (``continuous``: vLLM) is instead handed each job as
it comes, up to ``max_batch`` at once, and stepped in between; each answer goes back as soon as that
job is done. Jobs submitted with ``low_priority`` (a live stream's provisional re-decodes) run only when
nothing else waits: a turn's final decode or a file never queues behind them. If a batched call
fails, its jobs are retried one by one, so one bad clip fails only its
own request. An optional ``observer`` hears each batch's size and its jobs' queue waits (the
metrics module counts them; this module stays free of Prometheus).
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from app.engines.base import SAMPLE_RATE, DecodeOptions, Engine

log = logging.getLogger(__name__)

# Told once per batch: its size and how long each of its jobs waited in the queue (seconds).
BatchObserver = Callable[[int, Sequence[float]], None]


_NORMAL, _LOW, _STOP = 0, 1, 2   # priorities: lower runs first


class QueueFull(Exception):
    """Raised by ``submit`` when the instance already holds as many requests as it may."""


class JobFuture(Future):
    """A job's future; once the job has run, it also tells where the job's time went."""

    queue_seconds: float | None = None       # submitted -> its engine call began
    inference_seconds: float | None = None   # the engine call (its batch's, when batched)


@dataclass
class _Job:
    audio: np.ndarray
    options: DecodeOptions | None  # None: detect the language instead of transcribing
    future: JobFuture = field(default_factory=JobFuture)
    enqueued_at: float = field(default_factory=time.monotonic)


class InferenceQueue:
    def __init__(self, max_pending: int, max_batch: int = 1, max_wait_ms: float = 0.0,
                 observer: BatchObserver | None = None):
        self.max_pending = max_pending
        self.max_batch = max(1, min(max_batch, max_pending))  # a batch never holds more than the queue
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.observer = observer
        # (priority, order, job): FIFO within a priority; the stop marker (None) sorts after every job.
        self._jobs: queue.PriorityQueue[tuple[int, int, _Job | None]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._pending = 0          # waiting + running
        self._running = 0
        self.busy_since: float | None = None  # monotonic start of the engine call in progress
        self.busy_audio_seconds = 0.0         # audio that engine call holds (all its clips)
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
            self._jobs.put((_STOP, next(self._order), None))
            self._thread.join()
            self._thread = None

    def submit(self, audio: np.ndarray, options: DecodeOptions, low_priority: bool = False) -> JobFuture:
        """Queue a transcription; its future's result is a ``Transcript``. A ``low_priority`` job waits
        behind every other job, including ones submitted after it."""
        return self._put(_Job(audio, options), _LOW if low_priority else _NORMAL)

    def submit_language_detection(self, audio: np.ndarray) -> JobFuture:
        """Queue a language detection; its future's result is ``(language, probability)``."""
        return self._put(_Job(audio, None))

    def _put(self, job: _Job, priority: int = _NORMAL) -> JobFuture:
        with self._lock:
            if self._pending >= self.max_pending:
                raise QueueFull(f"{self._pending} requests already queued (limit {self.max_pending})")
            self._pending += 1
        self._jobs.put((priority, next(self._order), job))
        return job.future

    def _run(self, engine: Engine) -> None:
        if getattr(engine, "continuous", False):
            self._run_continuous(engine)
            return
        stopping = False
        while not stopping:
            batch, stopping = self._next_batch()
            if batch:
                self._execute(engine, batch)

    def _run_continuous(self, engine) -> None:
        """Jobs begun as they come (``engine.begin``), at most ``max_batch`` at once, and the engine
        stepped (``engine.step``) between arrivals; each future is answered when its job ends. The
        watchdog sees one step at a time, over the audio of every job begun. If a step fails, every job
        begun fails with its error and the engine forgets them (``engine.abandon``)."""
        begun: dict[int, tuple[_Job, float]] = {}
        stopping = False
        while begun or not stopping:
            admitted: list[float] = []
            while not stopping and len(begun) < self.max_batch:
                try:   # wait for work only when nothing is being decoded
                    _, _, job = self._jobs.get_nowait() if begun else self._jobs.get()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                if not job.future.set_running_or_notify_cancel():
                    self._release(1, 0)
                    continue
                key, now = next(self._order), time.monotonic()
                try:
                    engine.begin(key, job.audio, job.options)
                except Exception as e:  # noqa: BLE001 - a job the engine refuses fails alone
                    self._release(1, 0)
                    job.future.set_exception(e)
                    continue
                begun[key] = (job, now)
                admitted.append(now - job.enqueued_at)
                with self._lock:
                    self._running += 1
            if admitted:
                self._observe(admitted)
            if not begun:
                continue
            self.busy_audio_seconds = sum(len(job.audio) for job, _ in begun.values()) / SAMPLE_RATE
            self.busy_since = time.monotonic()
            try:
                finished = engine.step()
            except Exception as e:  # noqa: BLE001 - the engine's state is unknown: drop what it held
                log.exception("an engine step failed; failing the %d jobs it held", len(begun))
                try:
                    engine.abandon()
                except Exception:  # noqa: BLE001 - the jobs still get their error below
                    log.exception("abandoning the failed step's jobs failed too")
                finished = [(key, False, e) for key in list(begun)]
            finally:
                self.busy_since = None
            done = time.monotonic()
            for key, ok, value in finished:
                job, started = begun.pop(key)
                self._release(1, 1)
                _settle(job, ok, value, started, done - started)

    def _next_batch(self) -> tuple[list[_Job], bool]:
        """Block for the first live job, then take more until the batch is full or the first job has
        waited ``max_wait``; jobs already queued are taken without waiting. Returns (batch, stop)."""
        batch: list[_Job] = []
        deadline: float | None = None
        while len(batch) < self.max_batch:
            try:
                if deadline is None:
                    _, _, job = self._jobs.get()
                else:
                    remaining = deadline - time.monotonic()
                    _, _, job = self._jobs.get(timeout=remaining) if remaining > 0 else self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return batch, True
            # A request that gave up (deadline passed) cancelled its future: skip its work.
            if not job.future.set_running_or_notify_cancel():
                self._release(1, 0)
                continue
            if deadline is None:
                deadline = job.enqueued_at + self.max_wait
            batch.append(job)
        return batch, False

    def _execute(self, engine: Engine, batch: list[_Job]) -> None:
        started = time.monotonic()
        with self._lock:
            self._running = len(batch)
            self.busy_audio_seconds = sum(len(job.audio) for job in batch) / SAMPLE_RATE
            self.busy_since = started
        self._observe([started - job.enqueued_at for job in batch])
        outcomes = _outcomes(engine, batch)
        inference = time.monotonic() - started
        self.busy_since = None
        self._release(len(batch), len(batch))
        for job, (ok, value) in zip(batch, outcomes):
            _settle(job, ok, value, started, inference)

    def _observe(self, waits: list[float]) -> None:
        """Tell the observer about jobs handed to the engine together and how long each waited."""
        if self.observer is not None:
            try:
                self.observer(len(waits), waits)
            except Exception:  # noqa: BLE001 - metrics must never stop inference
                log.exception("batch observer failed")

    def _release(self, jobs: int, running: int) -> None:
        with self._lock:
            self._pending -= jobs
            self._running -= running


def _settle(job: _Job, ok: bool, value, started: float, inference: float) -> None:
    """Answer a job's future with its result or its error (the request thread reports an error; the
    inference thread lives on), with where its time went."""
    job.future.queue_seconds, job.future.inference_seconds = started - job.enqueued_at, inference
    if ok:
        job.future.set_result(value)
    else:
        job.future.set_exception(value)


def _outcomes(engine: Engine, batch: list[_Job]) -> list[tuple[bool, object]]:
    """(True, result) or (False, exception) per job, in the batch's order: one batched engine call per
    kind of job, else one call per job."""
    outcomes: list[tuple[bool, object] | None] = [None] * len(batch)
    for detect in (False, True):
        indices = [i for i, job in enumerate(batch) if (job.options is None) == detect]
        for i, outcome in zip(indices, _run_kind(engine, [batch[i] for i in indices], detect)):
            outcomes[i] = outcome
    return outcomes


def _run_kind(engine: Engine, jobs: list[_Job], detect: bool) -> list[tuple[bool, object]]:
    def call(group: list[_Job]) -> list:
        audios = [job.audio for job in group]
        if detect:
            results = engine.detect_language(audios)
        elif len(group) == 1:
            results = [engine.transcribe(audios[0], group[0].options)]
        else:
            results = engine.transcribe_batch(audios, [job.options for job in group])
        if len(results) != len(group):
            raise RuntimeError(f"engine returned {len(results)} results for {len(group)} clips")
        return results

    if len(jobs) > 1:
        try:
            return [(True, result) for result in call(jobs)]
        except Exception:  # noqa: BLE001 - retried one by one below, so only a bad clip fails
            log.warning("a batch of %d failed; retrying its clips one by one", len(jobs), exc_info=True)
    outcomes: list[tuple[bool, object]] = []
    for job in jobs:
        try:
            outcomes.append((True, call([job])[0]))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting request
            outcomes.append((False, e))
    return outcomes


def result_within(future: Future, timeout: float):
    """Wait for a job; on timeout cancel it if it has not started, so it frees its slot."""
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        future.cancel()
        raise
