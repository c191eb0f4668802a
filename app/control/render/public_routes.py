"""The routes clients may reach through the public port: the one list nginx's template and the tests read.

Everything else an instance serves (``/metrics``, ``/admin/*``) stays on its loopback port; nginx
answers 404 for any path not listed here. Each route has a kind, which sets how nginx treats it:

- ``api``: the client API. API keys and the rate limit apply, and nginx may retry a request on
  another instance (the upload is buffered): safe because these requests change nothing on the
  server. A route that creates state (a job) must not be ``api``; give it a kind without retries.
- ``probe``: ``/health`` and ``/ready``, open to load balancers and monitors, never limited.
- ``docs``: documentation pages and their assets, public, read-only.
- ``realtime``: the live-transcription WebSocket. Keys and limits as ``api``; the upgrade headers pass
  through, nothing is buffered, and reads wait as long as a stream may stay quiet. Another instance is
  tried only at the handshake (a full instance answers 503): an open stream stays on its instance.
- ``jobs``: async jobs (only where ``jobs = true``). Keys and limits as ``api``, the larger job upload
  limit, and never a resent POST: it creates a job.
"""
from __future__ import annotations

from dataclasses import dataclass


KINDS = ("api", "probe", "docs", "jobs", "realtime")


@dataclass(frozen=True)
class PublicRoute:
    path: str
    kind: str            # api | probe | docs | jobs | realtime
    prefix: bool = False  # True: every path under ``path`` (which ends with "/")

    def __post_init__(self):
        # nginx's template has a block for each kind: a new kind (a route that creates a job, say)
        # needs its own there, with the API's keys and limits but without the retry.
        if self.kind not in KINDS:
            raise ValueError(f"{self.path}: unknown route kind {self.kind!r}; add it to app/control/render/templates/nginx/nginx.conf.j2")

    def matches(self, path: str) -> bool:
        return path.startswith(self.path) if self.prefix else path == self.path


PUBLIC_ROUTES: tuple[PublicRoute, ...] = (
    PublicRoute("/asr", "api"),
    PublicRoute("/detect-language", "api"),
    PublicRoute("/v1/audio/", "api", prefix=True),
    PublicRoute("/v1/models", "api"),
    PublicRoute("/v1/models/", "api", prefix=True),
    PublicRoute("/v1/realtime", "realtime"),
    PublicRoute("/v1/jobs", "jobs"),
    PublicRoute("/v1/jobs/", "jobs", prefix=True),
    PublicRoute("/health", "probe"),
    PublicRoute("/ready", "probe"),
    PublicRoute("/", "docs"),
    PublicRoute("/docs", "docs"),
    PublicRoute("/docs/", "docs", prefix=True),
    PublicRoute("/openapi.json", "docs"),
    PublicRoute("/static/", "docs", prefix=True),   # Swagger UI's files
)


def is_public(path: str) -> bool:
    return any(route.matches(path) for route in PUBLIC_ROUTES)
