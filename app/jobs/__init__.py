"""Async jobs for recordings too long to wait for: ``POST /v1/jobs`` stores the audio and a queued job
(``app.jobs.api``), a supervised runner decodes it chunk by chunk over the pool (``app.jobs.runner``),
and both meet in one SQLite database (``app.jobs.store``).

Where a job's audio lives: ``<run_dir>/jobs/audio/<id>.flac``, the decoded 16 kHz mono samples as
16-bit FLAC (never the client's file or name), in a 0700 directory. It is written under a temporary
name and renamed, counted against ``job_max_storage_mb`` while the job is unfinished, and removed as
soon as the job finishes, fails or is cancelled (the runner also removes any file no live job owns).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import soundfile

from app.config import Settings
from app.engines.base import SAMPLE_RATE
from app.jobs.store import JobStore

_JOB_ID = re.compile(r"[0-9a-f]{32}")


def db_path(settings: Settings) -> Path:
    return settings.jobs_dir / "jobs.sqlite3"


def store(settings: Settings) -> JobStore:
    return JobStore(db_path(settings))


def valid_id(job_id: str) -> bool:
    return bool(_JOB_ID.fullmatch(job_id))


def audio_path(settings: Settings, job_id: str) -> Path:
    if not valid_id(job_id):  # the id names a file: only our own hex ids ever do
        raise ValueError(f"not a job id: {job_id[:40]!r}")
    return settings.jobs_dir / "audio" / f"{job_id}.flac"


def save_audio(path: Path, samples: np.ndarray) -> int:
    """Write the samples as 16 kHz mono 16-bit FLAC, atomically; its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    soundfile.write(str(tmp), np.clip(samples, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    os.replace(tmp, path)
    return path.stat().st_size


def load_audio(path: Path) -> np.ndarray:
    samples, _ = soundfile.read(str(path), dtype="float32")
    return samples


def remove_audio(settings: Settings, job_id: str) -> None:
    try:
        audio_path(settings, job_id).unlink()
    except FileNotFoundError:
        pass
