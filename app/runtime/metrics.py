"""Prometheus metrics for one instance, at ``GET /metrics``.

Each app gets its own registry (not the process-global default), so an app built by a test counts
alone. An instance is exactly one gunicorn worker (one model per process), so values live in this
process and no multiprocess mode is needed. Live values (queue depth, readiness, GPU) are read when
scraped rather than tracked on every change.
"""
from __future__ import annotations

import time

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from app.runtime import context
from app.hardware import nvml

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)


class InstanceCollector:
    """Scrape-time gauges from the instance's state and, on a GPU instance, NVML."""

    def __init__(self, instance):
        self.instance = instance
        self._gpu = _GpuReader(instance) if instance.device == "cuda" else None

    def collect(self):
        inst = self.instance
        yield GaugeMetricFamily("asr_requests_in_flight", "Transcription requests being handled (upload to answer)",
                                value=inst.requests_in_flight)
        yield GaugeMetricFamily("asr_queue_depth", "Requests in the instance's queue, waiting or running",
                                value=inst.queue.pending)
        yield GaugeMetricFamily("asr_queue_waiting", "Requests waiting for the model", value=inst.queue.waiting)
        yield GaugeMetricFamily("asr_queue_capacity", "Requests the queue holds before refusing with 503",
                                value=inst.queue.max_pending)
        yield GaugeMetricFamily("asr_streams_open", "Live transcription streams (WebSocket) open on this instance",
                                value=inst.streams_open)
        yield GaugeMetricFamily("asr_streams_capacity", "Streams the instance holds before refusing with 503 (max_streams)",
                                value=inst.settings.max_streams)
        yield GaugeMetricFamily("asr_instance_ready", "1 when the model is loaded and not draining",
                                value=1 if inst.ready else 0)
        yield GaugeMetricFamily("asr_model_load_seconds", "Seconds the model took to load and warm up",
                                value=inst.load_seconds or 0)
        if inst.settings.jobs:
            yield from _job_counts(inst.settings)
        # For the alert rules (deploy/prometheus/rules/): a model that will not load, and the pool's
        # configured ceiling, which the autoscaler never goes past.
        yield GaugeMetricFamily("asr_model_load_failed", "1 when loading the model failed (see /ready's error)",
                                value=1 if inst.state == "failed" else 0)
        yield GaugeMetricFamily("asr_autoscale_max_instances", "The pool's max_instances: the autoscaler's ceiling",
                                value=inst.settings.max_instances)
        if self._gpu:
            yield from self._gpu.collect()


def _job_counts(settings):
    """Jobs by state, from the run directory's job database (the same numbers on every instance:
    aggregate with max, not sum)."""
    from app.jobs import counts

    try:
        by_state = counts(settings)
    except Exception:  # noqa: BLE001 - a locked or damaged database must not break the scrape
        return
    if by_state is None:
        return
    family = GaugeMetricFamily("asr_jobs", "Async jobs by state (the pool's, read from the job database)",
                               labels=["state"])
    for state, n in by_state.items():
        family.add_metric([state], n)
    yield family


class _GpuReader:
    """The instance's own GPU through ``app.hardware.nvml`` (NVML): the GPU CUDA uses once the model has loaded,
    the pinned one before. An NVML fault gives ``asr_gpu_nvml_up 0`` and no figures, never a 500."""

    def __init__(self, instance):
        self.instance = instance

    def collect(self):
        ident = self.instance.gpu_identity()
        info = nvml.gpu(ident) if ident else None
        up = info is not None and not info.fault
        yield GaugeMetricFamily("asr_gpu_nvml_up", "1 when NVML answered for this instance's GPU, 0 on a fault",
                                value=1 if up else 0)
        if info is not None and (info.uuid or info.name):
            labels = GaugeMetricFamily("asr_gpu_info", "The GPU this instance computes on", labels=["uuid", "name", "index"])
            labels.add_metric([info.uuid, info.name, str(info.index)], 1)
            yield labels
        measured = (self.instance.gpu or {}).get("memory_mb")
        if measured is not None:
            yield GaugeMetricFamily("asr_gpu_instance_memory_bytes",
                                    "GPU memory this instance held after loading and warming up", value=measured * 2**20)
        if not up:
            return
        if info.utilization_pct is not None:
            yield GaugeMetricFamily("asr_gpu_utilization_percent", "GPU busy percentage", value=info.utilization_pct)
        if info.memory_used_mb is not None:
            yield GaugeMetricFamily("asr_gpu_memory_used_bytes", "GPU memory in use", value=info.memory_used_mb * 2**20)
            yield GaugeMetricFamily("asr_gpu_memory_total_bytes", "GPU memory in all", value=info.memory_total_mb * 2**20)


def init_app(app: Flask, instance) -> None:
    context.init_app(app)
    registry = CollectorRegistry()
    requests_total = Counter("asr_requests", "HTTP requests by route and status", ["route", "status"],
                             registry=registry)
    latency = Histogram("asr_request_duration_seconds", "Request latency by route", ["route"],
                        buckets=LATENCY_BUCKETS, registry=registry)
    audio_seconds = Counter("asr_audio_seconds", "Seconds of audio transcribed", registry=registry)
    batch_size = Histogram("asr_batch_size",
                           "Requests per engine call (dynamic batching); for vLLM, requests begun together",
                           buckets=BATCH_BUCKETS, registry=registry)
    queue_wait = Histogram("asr_queue_wait_seconds", "Time a request waited in the queue before its engine call",
                           buckets=QUEUE_WAIT_BUCKETS, registry=registry)

    def _observe_batch(size: int, waits) -> None:
        batch_size.observe(size)
        for wait in waits:
            queue_wait.observe(wait)

    # Per turn of a live stream: its end (server VAD's stop or the client's commit) to its transcript.
    turn_latency = Histogram("asr_stream_turn_latency_seconds", "Live streams: end of a turn to its completed transcript",
                             buckets=LATENCY_BUCKETS, registry=registry)

    instance.queue.observer = _observe_batch
    registry.register(InstanceCollector(instance))
    app.extensions["asr_metrics"] = {"audio_seconds": audio_seconds, "turn_latency": turn_latency}

    @app.after_request
    def _record(response):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        requests_total.labels(route, str(response.status_code)).inc()
        latency.labels(route).observe(time.monotonic() - g.request_started)
        return response

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def count_audio(app: Flask, seconds: float) -> None:
    app.extensions["asr_metrics"]["audio_seconds"].inc(seconds)


def observe_turn(app: Flask, seconds: float) -> None:
    app.extensions["asr_metrics"]["turn_latency"].observe(seconds)
