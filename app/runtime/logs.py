"""Logs as JSON lines on stdout, where supervisord (or the container runtime) collects and rotates them.

Every /asr request, and every failed request of any kind, gets one line with the request id nginx
assigned, so an operator can join nginx's access line, the instance's line and the client's report.
"""
from __future__ import annotations

import json
import logging
import sys
import time

from flask import Flask, g, request

from app.runtime import context

_PROBES = {"/health", "/ready", "/metrics"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure() -> None:
    """JSON to stdout for the whole process (the model loader, the engines, the request lines)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler.formatter.converter = time.gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def init_app(app: Flask, instance) -> None:
    context.init_app(app)
    log = logging.getLogger("asr.request")

    @app.after_request
    def _log(response):
        path = request.url_rule.rule if request.url_rule else request.path
        if path in _PROBES and response.status_code < 400:
            return response  # probes run every second; their successes are noise
        fields = {
            "request_id": g.get("request_id"),
            "instance": instance.id,
            "method": request.method,
            "path": path,
            "status": response.status_code,
            "latency_ms": round((time.monotonic() - g.request_started) * 1000, 1),
            "audio_seconds": g.get("audio_seconds"),
            "bytes_in": request.content_length,
            "client": request.headers.get("X-Real-IP") or request.remote_addr,
        }
        if g.get("error_code"):
            fields["error"] = g.error_code
        if g.get("job_ref"):  # a job's short hash: its id is a secret and never logged
            fields["job"] = g.job_ref
        log.info("%s %s %d", request.method, path, response.status_code, extra={"fields": fields})
        return response
