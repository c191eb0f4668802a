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

from app.hardware import cuda, nvml
from app.config import DECODE_START_SECONDS, Settings
from app.hardware.devices import parse_cores, pinned_gpu
from app.engines import load_engine
from app.engines.base import SAMPLE_RATE, DecodeOptions, Engine
from app.engines.models import display_name, resolve_model
from app.runtime.queue import InferenceQueue
from app.runtime.stuck_calls import Watchdog

log = logging.getLogger(__name__)

LOADING, READY, DRAINING, FAILED = "loading", "ready", "draining", "failed"
# Where a GPU instance's figure of its own memory comes from, best first; both can be read again later
# (the third, the GPU's used memory minus before loading, only while nothing else loads beside it).
_LIVE_MEMORY_SOURCES = ("nvml", "engine")
GPU_MEMORY_REFRESH_SECONDS = 30.0


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
        self.streams_open = 0        # live WebSocket streams (GET /v1/realtime) this instance holds
        self.gpu: dict | None = None  # on cuda: the GPU CUDA really uses, and the memory this holds
        self._gpu_used_before_mb: int | None = None   # the GPU's used memory before this loaded
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

    def open_stream(self) -> bool:
        """Take one of the ``max_streams`` stream slots; False when all are held (the handshake gets 503)."""
        with self._count_lock:
            if self.streams_open >= self.settings.max_streams:
                return False
            self.streams_open += 1
            return True

    def close_stream(self) -> None:
        with self._count_lock:
            self.streams_open -= 1

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
            if self.device == "cuda":
                self.gpu = self._check_gpu()
            self.engine = load_engine(s.engine, model, self.device, s.compute_type, threads,
                                      aligner_model=s.aligner_model, chunk_seconds=s.chunk_seconds,
                                      gpus=s.gpus_per_instance, max_sequences=self.queue.max_batch,
                                      gpu_memory_mb=s.instance_gpu_memory_mb)
            self._warm_up()
            if self.device == "cuda":
                self.gpu = {**self.gpu, **self._measure_gpu_memory()}   # one assignment: /health may be reading it
        except Exception as e:  # noqa: BLE001 - any load failure makes the instance unusable
            log.exception("model load failed")
            self.error, self.state = f"{type(e).__name__}: {e}", FAILED
            return
        self.load_seconds = time.monotonic() - t0
        self.queue.start(self.engine)
        # An engine call may run as long as its audio allows, and never past the request timeout.
        Watchdog(self.queue, s.request_timeout_seconds, seconds_per_audio_second=s.slowest_realtime_factor,
                 base_seconds=DECODE_START_SECONDS).start()
        self.state = READY
        if self.device == "cuda" and self.gpu.get("memory_source") in _LIVE_MEMORY_SOURCES:
            threading.Thread(target=self._follow_gpu_memory, name="gpu-memory", daemon=True).start()
        where = self.device if not self.gpu else f"{self.gpu['name']} {self.gpu['uuid']}"
        log.info("model %s loaded on %s in %.1f s%s", self.model_name, where, self.load_seconds,
                 f", holding {self.gpu['memory_mb']} MB of GPU memory" if self.gpu and self.gpu["memory_mb"] else "")

    def _warm_up(self) -> None:
        """The first client must not pay for lazy initialisation. On a GPU, one batch as large as the
        queue will run, of full 30 s windows, so kernels for that shape are ready and the memory
        measured afterwards is what a full batch holds; on CPU one short greedy decode."""
        if self.device != "cuda" or self.queue.max_batch == 1:
            self.engine.transcribe(np.zeros(SAMPLE_RATE, np.float32), DecodeOptions(beam_size=1))
            return
        window = np.zeros(30 * SAMPLE_RATE, np.float32)
        n = self.queue.max_batch
        self.engine.transcribe_batch([window] * n, [DecodeOptions(beam_size=self.settings.beam_size)] * n)

    def _check_gpu(self) -> dict:
        """The GPU CUDA gives this process as device 0, which must be the one placement chose."""
        seen = cuda.current_device()
        planned = self.settings.gpu_uuid
        if seen is None:
            raise RuntimeError("device is cuda but this host has no CUDA driver (libcuda.so.1 not found)")
        if seen.get("error"):
            raise RuntimeError(f"CUDA cannot give this instance a GPU (CUDA_VISIBLE_DEVICES={pinned_gpu()!r}, "
                               f"placed on {planned or 'any GPU'}): {seen['error']}")
        if planned and seen["uuid"] and not cuda.same_gpu(seen["uuid"], planned):
            raise RuntimeError(f"CUDA's device 0 is {seen['name']} {seen['uuid']}, but this instance was placed "
                               f"on {planned} (CUDA_VISIBLE_DEVICES={pinned_gpu()!r})")
        spans = self.settings.gpus_per_instance
        if seen.get("visible", 1) < spans:
            raise RuntimeError(f"this instance spans {spans} GPUs (gpus_per_instance) but CUDA sees "
                               f"{seen.get('visible')} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        # NVML's record of the same GPU: its own spelling of the UUID (MIG-... for a slice) names it on
        # /metrics and in status, and its used memory now is the baseline for the memory measured later.
        info = nvml.gpu(seen["uuid"]) if seen["uuid"] else None
        if (info is None or info.fault) and planned:   # (a different planned GPU was refused above)
            info = nvml.gpu(planned)
        nvml_ok = info is not None and not info.fault
        self._gpu_used_before_mb = info.memory_used_mb if nvml_ok else None
        return {"uuid": (info.uuid if nvml_ok and info.uuid else seen["uuid"]) or None,
                "name": seen["name"] or (info.name if nvml_ok else "") or None,
                "index": info.index if nvml_ok and info.index >= 0 else None,
                "pci_bus_id": seen["pci_bus_id"] or (info.pci_bus_id if nvml_ok else "") or None,
                "pinned": pinned_gpu(), "seen_by": "cuda", "gpus": min(seen.get("visible", 1), spans),
                "memory_mb": None, "memory_source": None}

    def _measure_gpu_memory(self) -> dict:
        """GPU memory this process holds after load and warm-up: NVML's per-process figure, else the
        engine's own (torch's reserved memory), else None (the control plane keeps its estimate)."""
        ident = self.gpu.get("uuid") or pinned_gpu() or "0"
        for source in _LIVE_MEMORY_SOURCES:
            memory = self._gpu_memory_from(source, ident)
            if memory is not None:
                return {"memory_mb": memory, "memory_source": source}
        # A container whose process ids NVML does not see, and an engine with no figure of its own
        # (CTranslate2): the GPU's used memory now minus before loading. Another process loading on the
        # same GPU meanwhile makes this too high, which errs on the safe side for placement.
        before, now = self._gpu_used_before_mb, nvml.gpu(ident)
        if before is not None and now is not None and now.memory_used_mb is not None and now.memory_used_mb > before:
            return {"memory_mb": now.memory_used_mb - before, "memory_source": "nvml-device-delta"}
        return {"memory_mb": None, "memory_source": None}

    def _gpu_memory_from(self, source: str, ident: str) -> int | None:
        if source == "nvml":
            return nvml.process_memory_mb(ident, os.getpid())
        own = getattr(self.engine, "gpu_memory_mb", None)
        return own() if callable(own) else None

    def refresh_gpu_memory(self) -> None:
        """Keep /health's figure the most this instance has held. The warm-up decodes silence, which
        stops after a few tokens; real speech at a wider beam takes more (the decoder's cache grows
        with every token), and placement must charge what an instance really comes to hold."""
        held = self.gpu or {}
        source = held.get("memory_source")
        if source not in _LIVE_MEMORY_SOURCES:
            return
        now = self._gpu_memory_from(source, held.get("uuid") or pinned_gpu() or "0")
        if now is not None and now > (held.get("memory_mb") or 0):
            self.gpu = {**held, "memory_mb": now}     # one assignment: /health may be reading it

    def _follow_gpu_memory(self) -> None:
        while self.state != FAILED:
            time.sleep(GPU_MEMORY_REFRESH_SECONDS)
            try:
                self.refresh_gpu_memory()
            except Exception:  # noqa: BLE001 - a figure that cannot be read now is kept as it was
                log.exception("reading this instance's GPU memory failed")

    def gpu_identity(self) -> str | None:
        """What /metrics reads NVML by: the GPU CUDA uses once known, else the pin."""
        if self.gpu and self.gpu.get("uuid"):
            return self.gpu["uuid"]
        return self.settings.gpu_uuid or pinned_gpu() or ("0" if self.device == "cuda" else None)


def pin_to_cores(cores_spec: str, cpu_threads: int) -> int:
    """Pin this process to its core set; return the thread count the engine should use.

    Also makes the OpenMP threads the engines start (CTranslate2's libgomp, torch's) sleep when they
    wait, unless ``OMP_WAIT_POLICY`` is already set: with the default, inside a gunicorn worker both of
    CTranslate2's threads kept spinning and a decode the bare engine does in 1 s took 11 s.
    Must run before the engine's library is first imported: OpenMP reads the variable
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
