"""Per-request values every hook shares: the request id (the client's or nginx's X-Request-ID, else
a fresh one) and the start time. Registered once per app, by whichever module needs it first."""
from __future__ import annotations

import time
import uuid

from flask import Flask, g, request


def init_app(app: Flask) -> None:
    if app.extensions.get("asr_request_context"):
        return
    app.extensions["asr_request_context"] = True

    @app.before_request
    def _begin():
        g.request_started = time.monotonic()
        g.request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
