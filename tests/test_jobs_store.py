"""The job database (app/jobs/store.py) on a real SQLite file: bounds, progress that counts each chunk
once, resuming with the plan a job started with, cancelling, and removal after the retention time."""
from __future__ import annotations

import sqlite3
import uuid

import pytest

from app.jobs.store import CANCELLED, DONE, QUEUED, RUNNING, JobStore, StoreFull

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
    assert set(store.expire(retention_seconds=60, now=now + 61)) == {waiting.id, finished.id}
    assert store.get(finished.id) is None and store.get(later.id).state == QUEUED
