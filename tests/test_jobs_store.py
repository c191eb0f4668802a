"""The job database (app/jobs/store.py) on a real SQLite file: bounds, progress that counts each chunk
once, resuming with the plan a job started with, cancelling, and removal after the retention time."""
from __future__ import annotations

import sqlite3
import uuid

import pytest

from app.jobs.store import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobStore, StoreFull

MB = 1024 * 1024


def new_id() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def store(tmp_path):
    return JobStore(tmp_path / "jobs" / "jobs.sqlite3")


def test_the_database_is_in_wal_mode_and_private(store):
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.path.parent.stat().st_mode & 0o777 == 0o700


def test_queued_jobs_and_stored_audio_are_bounded(store):
    first = store.create(new_id(), {"output": "json"}, 60.0, 1 * MB, max_queued=2, max_audio_bytes=3 * MB)
    store.create(new_id(), {}, 60.0, 1 * MB, max_queued=2, max_audio_bytes=3 * MB)
    with pytest.raises(StoreFull, match="2 jobs already waiting"):
        store.create(new_id(), {}, 60.0, 1 * MB, max_queued=2, max_audio_bytes=3 * MB)
    store.start(first.id, [(0, 16000, True)], None, 16000)  # running: no longer waiting, audio still stored
    with pytest.raises(StoreFull, match="storage full"):
        store.create(new_id(), {}, 60.0, 2 * MB, max_queued=2, max_audio_bytes=3 * MB)
    store.create(new_id(), {}, 60.0, 1 * MB, max_queued=2, max_audio_bytes=3 * MB)
    assert store.counts() == {"queued": 2, "running": 1, "done": 0, "failed": 0, "cancelled": 0}


def test_progress_counts_each_chunk_once(store):
    job = store.create(new_id(), {}, 10.0, 100, max_queued=4, max_audio_bytes=MB)
    plan = [(0, 64000, True), (64000, 96000, False), (96000, 160000, True)]
    store.start(job.id, plan, None, 16000)  # the chunk VAD calls silent is decoded too: nothing done yet
    assert store.get(job.id).state == RUNNING and store.get(job.id).done_seconds == 0
    store.finish_chunk(job.id, 0, {"text": "a"}, "asr-1", 4.0)
    store.finish_chunk(job.id, 0, {"text": "again"}, "asr-2", 4.0)  # a late duplicate changes nothing
    store.finish_chunk(job.id, 1, {"text": ""}, "asr-2", 2.0)
    assert store.get(job.id).done_seconds == pytest.approx(6.0)
    assert [c.result for c in store.chunks(job.id)] == [{"text": "a"}, {"text": ""}, None]
    # Resumed (the runner restarted): the plan it started with stays, whatever a new plan would be.
    store.start(job.id, [(0, 160000, True)], None, 16000)
    assert [(c.start, c.end) for c in store.chunks(job.id)] == [(a, b) for a, b, _ in plan]
    assert store.next_job().id == job.id  # a running job goes before any queued one
    store.complete(job.id, {"text": "a b"})
    done = store.get(job.id)
    assert done.state == DONE and done.result == {"text": "a b"} and done.done_seconds == 10.0
    assert done.audio_bytes == 0 and store.next_job() is None


def test_cancel_only_unfinished_jobs_and_expire_finished_ones(store):
    waiting = store.create(new_id(), {}, 5.0, 100, max_queued=4, max_audio_bytes=MB)
    assert store.cancel(waiting.id).state == CANCELLED
    finished = store.create(new_id(), {}, 5.0, 100, max_queued=4, max_audio_bytes=MB)
    store.complete(finished.id, {"text": ""})
    assert store.cancel(finished.id).state == DONE
    later = store.create(new_id(), {}, 5.0, 100, max_queued=4, max_audio_bytes=MB)
    now = store.get(finished.id).finished
    assert store.expire(retention_seconds=60, now=now + 30) == []
    assert store.get(later.id).state == QUEUED
    # 61 s on, the finished jobs are past their retention, and so is the job queued all that time.
    assert set(store.expire(retention_seconds=60, now=now + 61)) == {waiting.id, finished.id, later.id}
    assert store.get(finished.id) is None and store.get(later.id) is None


def test_jobs_stuck_queued_or_running_expire_from_when_they_were_submitted(store):
    running = store.create(new_id(), {}, 5.0, 100, max_queued=4, max_audio_bytes=MB)
    store.start(running.id, [(0, 16000, True)], None, 16000)
    queued = store.create(new_id(), {}, 5.0, 100, max_queued=4, max_audio_bytes=MB)
    assert store.expire(retention_seconds=100, now=running.created + 99) == []
    assert set(store.expire(retention_seconds=100, now=queued.created + 101)) == {running.id, queued.id}
    assert store.get(running.id) is None and store.get(queued.id) is None
    assert store.chunks(running.id) == []   # its chunks went with it


def test_a_failed_job_keeps_its_audio_and_a_retry_keeps_its_decoded_chunks(store):
    job = store.create(new_id(), {}, 4.0, 1000, max_queued=4, max_audio_bytes=MB)
    store.start(job.id, [(0, 32000, True), (32000, 64000, True)], None, 16000)
    store.finish_chunk(job.id, 0, {"text": "kept"}, "asr-1", 2.0)
    assert [store.chunk_failed(job.id, 1, f"500 number {n}") for n in (1, 2)] == [1, 2]
    store.fail(job.id, "chunk 1 (2.0-4.0 s) failed 2 times")
    failed = store.get(job.id)
    assert failed.state == FAILED and failed.audio_bytes == 1000 and job.id in store.live_ids()
    assert store.chunks(job.id)[1].error == "500 number 2"
    assert store.cancel(job.id).state == FAILED   # finished: cancel leaves it
    again = store.retry(job.id)
    assert again.state == QUEUED and again.error is None and again.finished is None
    assert [(c.result, c.failures) for c in store.chunks(job.id)] == [({"text": "kept"}, 0), (None, 0)]
    assert store.retry(job.id).state == QUEUED    # only a failed job is retried; this changes nothing


def test_jobs_belong_to_an_owner_and_a_listing_shows_only_theirs(store):
    mine = store.create(new_id(), {}, 1.0, 10, max_queued=4, max_audio_bytes=MB, owner="a" * 64)
    theirs = store.create(new_id(), {}, 1.0, 10, max_queued=4, max_audio_bytes=MB, owner="b" * 64)
    store.complete(mine.id, {"text": "x"})
    assert [j.id for j in store.jobs("a" * 64)] == [mine.id]
    assert store.jobs("a" * 64)[0].result is None          # a listing carries no transcripts
    assert {j.id for j in store.jobs()} == {mine.id, theirs.id}
    assert store.get(theirs.id).owner == "b" * 64


def test_a_database_from_before_owners_and_failures_is_upgraded_in_place(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as db:   # the first release's tables, with one job in them
        db.executescript(
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL, created REAL NOT NULL, started REAL,"
            " finished REAL, params TEXT NOT NULL, duration REAL NOT NULL, audio_bytes INTEGER NOT NULL,"
            " done_seconds REAL NOT NULL DEFAULT 0, speech TEXT, error TEXT, result TEXT);"
            "CREATE TABLE chunks (job_id TEXT NOT NULL, idx INTEGER NOT NULL, start INTEGER NOT NULL,"
            " end INTEGER NOT NULL, speech INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, finished REAL,"
            " instance TEXT, result TEXT, PRIMARY KEY (job_id, idx));"
            "INSERT INTO jobs (id, state, created, params, duration, audio_bytes) VALUES ('old', 'running', 1, '{}', 2, 5);"
            "INSERT INTO chunks (job_id, idx, start, end, speech) VALUES ('old', 0, 0, 32000, 1);")
    store = JobStore(path)
    assert store.get("old").owner == "" and store.chunks("old")[0].failures == 0
    assert store.chunk_failed("old", 0, "boom") == 1
