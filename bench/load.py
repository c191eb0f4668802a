"""The load generator: real uploads to a loopback URL, at a fixed concurrency (closed loop) or a fixed
rate (open loop), bounded in request count and in time, so it always stops by itself."""
from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

from urllib3 import encode_multipart_formdata

from app.selfcheck.speech import Clip

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
REQUEST_TIMEOUT = 300


@dataclass
class Record:
    """One request: when it left and came back (monotonic seconds), and how it went."""

    run: str
    clip: str
    audio_s: float
    start: float
    end: float
    status: int            # HTTP status; 0 when no answer came
    error: str             # "" on success, else the service's error code or the exception's name
    instance: str = ""
    queue_s: float | None = None       # from the instance's Server-Timing header
    inference_s: float | None = None   # the engine call inside the instance

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def overhead(self) -> float | None:
        """Everything but the engine call: client, nginx, gunicorn, Flask, decoding, queue, JSON."""
        return None if self.inference_s is None else self.latency - self.inference_s

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    def row(self) -> dict:
        overhead = self.overhead
        return {**asdict(self), "latency_ms": round(self.latency * 1000, 3),
                "overhead_ms": None if overhead is None else round(overhead * 1000, 3)}


class Connection:
    """One keep-alive HTTP connection per thread, on the standard library's client: a load generator
    should cost as little as it can, and ``requests`` adds about a millisecond per request."""

    def __init__(self):
        self._conns: dict[tuple[str, int], http.client.HTTPConnection] = {}

    def post(self, url: str, body: bytes, content_type: str) -> tuple[int, dict[str, str], bytes]:
        parts = urlparse(url)
        key = (parts.hostname, parts.port or 80)
        for attempt in (1, 2):
            conn = self._conns.get(key)
            if conn is None:
                conn = self._conns[key] = http.client.HTTPConnection(*key, timeout=REQUEST_TIMEOUT)
            try:
                conn.request("POST", parts.path or "/", body=body, headers={"Content-Type": content_type})
                response = conn.getresponse()
                return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()  # the server closed an idle keep-alive connection: one fresh try
                del self._conns[key]
                if attempt == 2:
                    raise

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Uploads:
    """Each clip's multipart body, encoded once, so the client spends no time per request on it."""

    def __init__(self, clips: list[Clip]):
        self.clips = clips
        self._bodies = {c.name: encode_multipart_formdata({"audio": (c.name, c.data, "application/octet-stream")})
                        for c in clips}

    def post(self, connection: Connection, url: str, clip: Clip, run: str) -> Record:
        body, content_type = self._bodies[clip.name]
        start = time.monotonic()
        try:
            status, headers, content = connection.post(url, body, content_type)
        except (OSError, http.client.HTTPException) as e:
            return Record(run, clip.name, clip.duration, start, time.monotonic(), 0, type(e).__name__)
        end = time.monotonic()
        error = "" if status == 200 else _error_code(status, content)
        timing = _server_timing(headers.get("server-timing", ""))
        return Record(run, clip.name, clip.duration, start, end, status, error,
                      headers.get("x-asr-instance", ""), timing.get("queue"), timing.get("inference"))


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"the benchmark only sends to loopback addresses, not {host!r}")


def run_load(url: str, uploads: Uploads, schedule: list[Clip], run: str, *, concurrency: int = 1,
             rate: float | None = None, max_seconds: float = 300.0, progress=None) -> list[Record]:
    """Send ``schedule`` (clips in order) to ``url``: ``concurrency`` requests in flight at all times,
    or, with ``rate``, one request every 1/rate seconds whatever is in flight (at most ``concurrency``
    threads). Stops when the schedule is done or ``max_seconds`` have passed (no new request after)."""
    check_loopback(url)
    deadline = time.monotonic() + max_seconds
    records: list[Record] = []
    lock = threading.Lock()

    def record(r: Record) -> None:
        with lock:
            records.append(r)
        if progress is not None:
            progress.update(1)

    if rate:
        _open_loop(url, uploads, schedule, run, rate, concurrency, deadline, record)
    else:
        _closed_loop(url, uploads, schedule, run, concurrency, deadline, record)
    return sorted(records, key=lambda r: r.start)


def _closed_loop(url, uploads, schedule, run, concurrency, deadline, record) -> None:
    pending = iter(schedule)
    lock = threading.Lock()

    def worker() -> None:
        with Connection() as connection:
            while time.monotonic() < deadline:
                with lock:
                    clip = next(pending, None)
                if clip is None:
                    return
                record(uploads.post(connection, url, clip, run))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, concurrency))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _open_loop(url, uploads, schedule, run, rate, concurrency, deadline, record) -> None:
    local = threading.local()

    def send(clip: Clip) -> None:
        if not hasattr(local, "connection"):
            local.connection = Connection()
        record(uploads.post(local.connection, url, clip, run))

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for i, clip in enumerate(schedule):
            due = start + i / rate
            if due >= deadline:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            pool.submit(send, clip)


def _server_timing(header: str) -> dict[str, float]:
    """``queue;dur=1.2, inference;dur=850.0`` -> {"queue": 0.0012, "inference": 0.85} (seconds)."""
    out = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur":
                try:
                    out[name] = float(value) / 1000
                except ValueError:
                    pass
    return out


def _error_code(status: int, content: bytes) -> str:
    try:
        return json.loads(content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"http_{status}"
