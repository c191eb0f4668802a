"""Liveness, readiness and the drain switch.

``/health`` answers while the process lives; ``/ready`` only once the model is loaded and the
instance is not draining, which is what nginx, supervisord's operator and Kubernetes probes watch.
``/admin/*`` is reachable on the instance's loopback port only: nginx never proxies it.
"""
from __future__ import annotations

import os
import time

from flask import Blueprint, jsonify

from app.routes.asr import instance
from app.routes.openapi import Operation, register

bp = Blueprint("probes", __name__)

register(
    Operation("get", "/health", "Liveness: 200 while the process lives, with the instance's state", "probes",
              public=True),
    Operation("get", "/ready", "Readiness: 200 once the model is loaded and the instance is not draining",
              "probes", public=True, errors=("503",)),
)


@bp.get("/health")
def health():
    inst = instance()
    return jsonify(
        status="ok",
        instance=inst.id,
        port=inst.port,
        device=inst.device,
        cpu_cores=inst.settings.cpu_cores or None,
        gpu=inst.gpu,
        pid=os.getpid(),
        state=inst.state,
        error=inst.error,
        uptime_seconds=round(time.time() - inst.started_at, 1),
        engine=inst.settings.engine,
        model=inst.model_name,
        model_load_seconds=inst.load_seconds and round(inst.load_seconds, 2),
        requests_in_flight=inst.requests_in_flight,
        streams_open=inst.streams_open,
        queue={"running": inst.queue.in_flight, "waiting": inst.queue.waiting,
               "max": inst.queue.max_pending},
        model_config=model_config(inst),
    )


def model_config(inst) -> dict:
    """What the configuration made of this instance's model and its request defaults."""
    s = inst.settings
    return {
        "compute_type": inst.engine.compute_type if inst.engine else s.compute_type,
        "beam_size": s.beam_size,
        "max_batch": inst.queue.max_batch,
        "multilingual": inst.engine.multilingual if inst.engine else None,
        "max_audio_seconds": s.max_audio_seconds,
        "language": s.language or None,
        "detect_language": s.detect_language,
        "output": s.output,
        "word_timestamps": s.word_timestamps,
        "vad_filter": s.vad_filter,
    }


@bp.get("/ready")
def ready():
    inst = instance()
    if inst.ready:
        return jsonify(ready=True, instance=inst.id, state=inst.state)
    response = jsonify(
        ready=False, instance=inst.id, state=inst.state,
        error={"code": "not_ready", "message": inst.error or f"instance is {inst.state}"},
    )
    response.status_code = 503
    response.headers["Retry-After"] = str(inst.settings.retry_after_seconds)
    return response


@bp.post("/admin/drain")
def drain():
    inst = instance()
    inst.drain()
    return jsonify(state=inst.state, requests_in_flight=inst.requests_in_flight, streams_open=inst.streams_open)


@bp.post("/admin/undrain")
def undrain():
    inst = instance()
    inst.undrain()
    return jsonify(state=inst.state)
