"""This process's model instance: its state (loading, ready, draining, failed), engine and queue.

The model loads in a background thread after gunicorn forks the worker, so the HTTP server answers
``/health`` and ``/ready`` (503) while weights load, and CUDA is only ever initialised in the worker.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import numpy as np

from app.config import Settings
from app.control.placement import parse_cores
from app.engines import load_engine
from app.engines.base import SAMPLE_RATE, DecodeOptions, Engine
from app.engines.models import display_name, resolve_model
from app.queue import InferenceQueue
from app.watchdog import Watchdog

log = logging.getLogger(__name__)

LOADING, READY, DRAINING, FAILED = "loading", "ready", "draining", "failed"


class ModelInstance:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.id = settings.instance_id or f"asr-{settings.instance_port or os.getpid()}"
        self.port = settings.instance_port
        self.device = "cuda" if settings.device == "cuda" else "cpu"
        self.model_name = display_name(settings.model)
        self.queue = InferenceQueue(settings.max_queue, max_batch=settings.batch_size(self.device),
                                    max_wait_ms=settings.max_wait_ms)
        self.engine: Engine | None = None
        self.state = LOADING
        self.error: str | None = None
        self.started_at = time.time()
        self.load_seconds: float | None = None
        self.requests_in_flight = 0  # /asr requests between arrival and answer, decode included
        self._count_lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.state == READY

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def load_now(self) -> None:
        self._load()

    @contextlib.contextmanager
    def track_request(self):
        """Count a request in flight: a drain waits for this to reach zero before the stop."""
        with self._count_lock:
            self.requests_in_flight += 1
        try:
            yield
        finally:
            with self._count_lock:
                self.requests_in_flight -= 1

    def drain(self) -> None:
        if self.state == READY:
            self.state = DRAINING

    def undrain(self) -> None:
        if self.state == DRAINING:
            self.state = READY

    def _load(self) -> None:
        s = self.settings
        t0 = time.monotonic()
        try:
            threads = pin_to_cores(s.cpu_cores, s.cpu_threads) if self.device == "cpu" else 0
            model = resolve_model(s.engine, s.model, s.model_cache)
            self.engine = load_engine(s.engine, model, self.device, s.compute_type, threads,
                                      aligner_model=s.aligner_model, chunk_seconds=s.chunk_seconds)
            # One short greedy decode so the first client does not pay for lazy initialisation.
            self.engine.transcribe(np.zeros(SAMPLE_RATE, np.float32), DecodeOptions(beam_size=1))
        except Exception as e:  # noqa: BLE001 - any load failure makes the instance unusable
            log.exception("model load failed")
            self.error, self.state = f"{type(e).__name__}: {e}", FAILED
            return
        self.load_seconds = time.monotonic() - t0
        self.queue.start(self.engine)
        # A batch may hold max_batch clips of the longest allowed length.
        Watchdog(self.queue, s.max_inference_seconds * self.queue.max_batch).start()
        self.state = READY
        log.info("model %s loaded on %s in %.1f s", self.model_name, self.device, self.load_seconds)


def pin_to_cores(cores_spec: str, cpu_threads: int) -> int:
    """Pin this process to its core set; return the thread count the engine should use.

    Also makes the OpenMP threads the engines start (CTranslate2's libgomp, torch's) sleep when they
    wait, unless ``OMP_WAIT_POLICY`` is already set: with the default, inside a gunicorn worker both of
    CTranslate2's threads kept spinning and a decode the bare engine does in 1 s took 11 s
    (bench/README.md). Must run before the engine's library is first imported: OpenMP reads the variable
    when it loads.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if cores_spec:
        cores = parse_cores(cores_spec)
        # sched_setaffinity(0) pins only the calling thread: pin every thread this process has, so the
        # request threads gunicorn starts later (from its main thread) stay on the set too.
        for tid in _thread_ids():
            try:
                os.sched_setaffinity(tid, cores)
            except OSError:  # a thread that has just ended
                pass
        return cpu_threads or len(cores)
    return cpu_threads or len(os.sched_getaffinity(0))


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: this thread only
        return [0]
