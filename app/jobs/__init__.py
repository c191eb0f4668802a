"""Async jobs for recordings too long to wait for: ``POST /v1/jobs`` stores the audio and a queued job
(``app.routes.jobs``), a supervised runner decodes it chunk by chunk over the pool (``app.jobs.runner``),
and both meet in one SQLite database (``app.jobs.store``).

Where a job's audio lives: ``<run_dir>/jobs/audio/<id>.flac``, the decoded 16 kHz mono samples as
16-bit FLAC (never the client's file or name), in a 0700 directory. It is written under a temporary
name and renamed, counted against ``job_max_storage_mb`` while the job is unfinished, and removed as
soon as the job finishes or is cancelled; a failed job keeps it until it expires, so that
``asrctl jobs retry`` can run it again (the runner also removes any file no such job owns). An upload
is streamed to ``<run_dir>/jobs/uploads`` (unnamed files, gone when the request ends) and decoded from
there block by block, so an instance never holds the upload or its decoded samples whole.

Who sees a job: with API keys on, only the key that created it (``owner_hash``); ids are secrets and
appear in logs only as ``ref(id)``, a short hash.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import numpy as np
import soundfile

from app.config import Settings
from app.jobs.store import JobStore

_JOB_ID = re.compile(r"[0-9a-f]{32}")


def db_path(settings: Settings) -> Path:
    return settings.jobs_dir / "jobs.sqlite3"


def store(settings: Settings) -> JobStore:
    return JobStore(db_path(settings))


def counts(settings: Settings) -> dict[str, int] | None:
    """Jobs by state (/metrics, ``asrctl status``), or None before the first job: the database is
    not created by reading it."""
    path = db_path(settings)
    return JobStore(path).counts() if path.exists() else None


def owner_hash(api_key: str) -> str:
    """What the job database stores of the API key that created a job: never the key itself."""
    return hashlib.sha256(b"asr-job-owner\0" + api_key.encode()).hexdigest()


def ref(job_id: str) -> str:
    """A job's name in logs and request ids: a short hash, so a log never holds the id (a secret)."""
    return hashlib.sha256(job_id.encode(errors="replace")).hexdigest()[:12]


def upload_dir(settings: Settings) -> Path:
    path = settings.jobs_dir / "uploads"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def heartbeat_path(settings: Settings) -> Path:
    return settings.jobs_dir / "runner.heartbeat"


def beat(path: Path) -> None:
    """The job runner says it is alive: its pid and the time, replaced atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{os.getpid()} {time.time():.3f}\n")
    os.replace(tmp, path)


def last_beat(path: Path) -> tuple[int, float] | None:
    """(pid, time) of the runner's last heartbeat, or None."""
    try:
        pid, stamp = path.read_text().split()
        return int(pid), float(stamp)
    except (OSError, ValueError):
        return None


def valid_id(job_id: str) -> bool:
    return bool(_JOB_ID.fullmatch(job_id))


def audio_path(settings: Settings, job_id: str) -> Path:
    if not valid_id(job_id):  # the id names a file: only our own hex ids ever do
        raise ValueError(f"not a job id: {job_id[:40]!r}")
    return settings.jobs_dir / "audio" / f"{job_id}.flac"


def load_audio(path: Path) -> np.ndarray:
    samples, _ = soundfile.read(str(path), dtype="float32")
    return samples


def remove_audio(settings: Settings, job_id: str) -> None:
    try:
        audio_path(settings, job_id).unlink()
    except FileNotFoundError:
        pass
