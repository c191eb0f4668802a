"""The job database: one SQLite file in the run directory, shared by the instances and the runner.

SQLite in WAL mode: readers (``GET /v1/jobs/{id}`` on any instance) never block the runner's writes,
and every write is one short transaction, so it survives any process being killed between two of
them. A job's chunks are rows of their own: a chunk's transcript is stored the moment it is decoded
and is never decoded again, which is what lets a job resume after a restart of the runner or of any
instance. Each connection lives for one call: processes and threads share nothing but the file.

States: ``queued`` -> ``running`` -> ``done`` | ``failed``; ``queued``/``running`` -> ``cancelled``;
``failed`` -> ``queued`` again by ``asrctl jobs retry`` (a failed job keeps its audio until it expires).

A job belongs to the API key that created it: ``owner`` holds a hash of that key (never the key),
empty where no API keys are configured.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINISHED = (DONE, FAILED, CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    params TEXT NOT NULL,          -- the /asr parameters, checked, as JSON
    duration REAL NOT NULL,        -- seconds of audio
    audio_bytes INTEGER NOT NULL,  -- size of the stored audio (0 once removed)
    done_seconds REAL NOT NULL DEFAULT 0,
    speech TEXT,                   -- vad_filter: where the kept speech lies (JSON), fixed when planned
    error TEXT,
    result TEXT,                   -- the transcript (JSON) once done
    owner TEXT NOT NULL DEFAULT '' -- app.jobs.owner_hash of the API key that created it ('' without keys)
);
CREATE TABLE IF NOT EXISTS chunks (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    start INTEGER NOT NULL,        -- samples, on the timeline that was cut
    end INTEGER NOT NULL,
    speech INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    finished REAL,
    instance TEXT,
    result TEXT,                   -- the chunk's transcript (JSON), on the chunk's own timeline
    failures INTEGER NOT NULL DEFAULT 0,  -- attempts an instance failed (5xx, timeout, died mid-chunk)
    error TEXT,                    -- the last failure
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, created);
"""
# Columns added since the first release: a database made before them gets them on open.
_ADDED_COLUMNS = (("jobs", "owner", "TEXT NOT NULL DEFAULT ''"),
                  ("chunks", "failures", "INTEGER NOT NULL DEFAULT 0"), ("chunks", "error", "TEXT"))
# Jobs whose audio is still on disk: those that may still run, and failed ones (a retry needs it).
_KEEPS_AUDIO = (QUEUED, RUNNING, FAILED)


class StoreFull(Exception):
    """Too many jobs waiting, or too much audio stored: try again later (503)."""


@dataclass(frozen=True)
class Job:
    id: str
    state: str
    created: float
    started: float | None
    finished: float | None
    params: dict
    duration: float
    audio_bytes: int
    done_seconds: float
    speech: list | None
    error: str | None
    result: dict | None
    owner: str = ""


@dataclass(frozen=True)
class ChunkRow:
    idx: int
    start: int
    end: int
    speech: bool
    attempts: int
    finished: float | None
    instance: str | None
    result: dict | None
    failures: int = 0
    error: str | None = None


class JobStore:
    def __init__(self, path: Path, timeout: float = 30.0):
        """``timeout``: how long a call waits for another writer's lock before it raises."""
        self.path = Path(path)
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            for table, column, kind in _ADDED_COLUMNS:
                if column not in {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    @contextmanager
    def _connect(self):
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at each checkpoint, never corrupt
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self):
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- the API's side --

    def create(self, job_id: str, params: dict, duration: float, audio_bytes: int,
               max_queued: int, max_audio_bytes: int, owner: str = "") -> Job:
        """Add a queued job, or raise ``StoreFull`` (checked and inserted in one transaction)."""
        with self._transaction() as db:
            queued = db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (QUEUED,)).fetchone()[0]
            if queued >= max_queued:
                raise StoreFull(f"{queued} jobs already waiting (limit {max_queued})")
            stored = db.execute("SELECT COALESCE(SUM(audio_bytes), 0) FROM jobs").fetchone()[0]
            if stored + audio_bytes > max_audio_bytes:
                raise StoreFull(f"job audio storage full ({stored + audio_bytes} of {max_audio_bytes} bytes)")
            db.execute("INSERT INTO jobs (id, state, created, params, duration, audio_bytes, owner) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (job_id, QUEUED, time.time(), json.dumps(params), duration, audio_bytes, owner))
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, owner: str | None = None) -> list[Job]:
        """Every job, newest first, without results (``owner``: only that key's; None: all)."""
        query = "SELECT * FROM jobs" + (" WHERE owner = ?" if owner is not None else "") + " ORDER BY created DESC"
        with self._connect() as db:
            rows = db.execute(query, (owner,) if owner is not None else ()).fetchall()
        return [_job(r, with_result=False) for r in rows]

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running job (its audio is no longer counted); a finished one is left."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET state = ?, finished = ?, audio_bytes = 0 WHERE id = ? AND state IN (?, ?)",
                       (CANCELLED, time.time(), job_id, QUEUED, RUNNING))
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def counts(self) -> dict[str, int]:
        with self._connect() as db:
            rows = db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | {state: n for state, n in rows}

    # -- the runner's side --

    def next_job(self) -> Job | None:
        """The job to work on: one already running (resumed after a restart), else the oldest queued."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY state = ? DESC, created LIMIT 1",
                             (RUNNING, QUEUED, RUNNING)).fetchone()
        return _job(row) if row else None

    def start(self, job_id: str, chunks: list[tuple[int, int, bool]], speech: list | None,
              sample_rate: int) -> None:
        """Record the job's chunks (once: a resumed job keeps the plan it started with) and mark it
        running. Every chunk is decoded (its ``speech`` flag only tells where VAD heard some), so
        progress starts at 0 and each chunk adds its share as it finishes (``finish_chunk``)."""
        with self._transaction() as db:
            if db.execute("SELECT COUNT(*) FROM chunks WHERE job_id = ?", (job_id,)).fetchone()[0] == 0:
                db.executemany("INSERT INTO chunks (job_id, idx, start, end, speech) VALUES (?, ?, ?, ?, ?)",
                               [(job_id, i, a, b, int(s)) for i, (a, b, s) in enumerate(chunks)])
                db.execute("UPDATE jobs SET done_seconds = 0, speech = ? WHERE id = ?",
                           (json.dumps(speech) if speech is not None else None, job_id))
            db.execute("UPDATE jobs SET state = ?, started = COALESCE(started, ?) WHERE id = ? AND state IN (?, ?)",
                       (RUNNING, time.time(), job_id, QUEUED, RUNNING))

    def chunks(self, job_id: str) -> list[ChunkRow]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM chunks WHERE job_id = ? ORDER BY idx", (job_id,)).fetchall()
        return [ChunkRow(r["idx"], r["start"], r["end"], bool(r["speech"]), r["attempts"], r["finished"],
                         r["instance"], json.loads(r["result"]) if r["result"] else None, r["failures"], r["error"])
                for r in rows]

    def attempt(self, job_id: str, idx: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE chunks SET attempts = attempts + 1 WHERE job_id = ? AND idx = ?", (job_id, idx))

    def chunk_failed(self, job_id: str, idx: int, error: str) -> int:
        """Count a failed attempt at a chunk (the instance took it and failed); the failures so far."""
        with self._transaction() as db:
            db.execute("UPDATE chunks SET failures = failures + 1, error = ? WHERE job_id = ? AND idx = ?",
                       (error[:500], job_id, idx))
            row = db.execute("SELECT failures FROM chunks WHERE job_id = ? AND idx = ?", (job_id, idx)).fetchone()
        return row[0] if row else 0

    def finish_chunk(self, job_id: str, idx: int, result: dict, instance: str, seconds: float) -> None:
        """Store a chunk's transcript and move the job's progress on, once (a second store is a no-op)."""
        with self._transaction() as db:
            changed = db.execute("UPDATE chunks SET result = ?, finished = ?, instance = ? "
                                 "WHERE job_id = ? AND idx = ? AND result IS NULL",
                                 (json.dumps(result), time.time(), instance, job_id, idx)).rowcount
            if changed:
                db.execute("UPDATE jobs SET done_seconds = done_seconds + ? WHERE id = ?", (seconds, job_id))

    def complete(self, job_id: str, result: dict) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET state = ?, finished = ?, result = ?, done_seconds = duration, audio_bytes = 0 "
                       "WHERE id = ? AND state IN (?, ?)", (DONE, time.time(), json.dumps(result), job_id, QUEUED, RUNNING))

    def fail(self, job_id: str, error: str) -> None:
        """Mark the job failed; its audio stays (and stays counted) until it expires or is retried."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET state = ?, finished = ?, error = ? WHERE id = ? AND state IN (?, ?)",
                       (FAILED, time.time(), error[:2000], job_id, QUEUED, RUNNING))

    def retry(self, job_id: str) -> Job | None:
        """Queue a failed job again: chunks already decoded are kept, failure counts start over."""
        with self._transaction() as db:
            if db.execute("UPDATE jobs SET state = ?, finished = NULL, error = NULL WHERE id = ? AND state = ?",
                          (QUEUED, job_id, FAILED)).rowcount:
                db.execute("UPDATE chunks SET failures = 0, error = NULL WHERE job_id = ?", (job_id,))
        return self.get(job_id)

    def expire(self, retention_seconds: float, now: float | None = None) -> list[str]:
        """Remove jobs past the retention time; their ids. A finished job counts from when it finished;
        one still queued or running from when it was submitted (stuck that long, it is given up)."""
        cutoff = (time.time() if now is None else now) - retention_seconds
        with self._transaction() as db:
            ids = [r[0] for r in db.execute(
                f"SELECT id FROM jobs WHERE (state IN ({','.join('?' * len(FINISHED))}) AND finished < ?) "
                "OR (state IN (?, ?) AND created < ?)", (*FINISHED, cutoff, QUEUED, RUNNING, cutoff)).fetchall()]
            db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
        return ids

    def live_ids(self) -> set[str]:
        """Jobs whose audio is still needed (queued, running, or failed and so retryable)."""
        with self._connect() as db:
            return {r[0] for r in db.execute(f"SELECT id FROM jobs WHERE state IN ({','.join('?' * len(_KEEPS_AUDIO))})",
                                             _KEEPS_AUDIO)}


def _job(row: sqlite3.Row, with_result: bool = True) -> Job:
    return Job(id=row["id"], state=row["state"], created=row["created"], started=row["started"],
               finished=row["finished"], params=json.loads(row["params"]), duration=row["duration"],
               audio_bytes=row["audio_bytes"], done_seconds=row["done_seconds"],
               speech=json.loads(row["speech"]) if row["speech"] else None, error=row["error"],
               result=json.loads(row["result"]) if row["result"] and with_result else None, owner=row["owner"])
