"""Long recordings through the real service (asrctl, supervisord, nginx, two gunicorn instances with
the real model): a long /asr request decoded on both instances, and an async job that survives
``asrctl restart --rolling`` (instances and the job runner) without losing a finished chunk, in
chunks of one window; and with the defaults, one conditioned span per instance on both paths."""
from __future__ import annotations

import http.client
import json
import threading
import time

import numpy as np
import pytest
import requests
import srt

from app.jobs.store import JobStore
from support import bring_up, english_set_a, espeak, normalize, set_a_sequence, spoken_wav, wav_bytes, wer

pytestmark = pytest.mark.integration

RATE = 16_000


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    # /asr takes at most 100 s; a job takes the 135 s recording, uploaded as 48 kHz stereo (26 MB, over
    # /asr's upload limit): nginx and the instance size /v1/jobs' limit from job_max_audio_seconds.
    # Chunks of one window (span_seconds = 0): enough of them that the restart lands in the middle of the job.
    svc = bring_up(tmp_path_factory.mktemp("long"), 2, "--max-audio-seconds", "100",
                   env={"ASR_JOB_MAX_QUEUED": "1", "ASR_SPAN_SECONDS": "0"})
    try:
        yield svc
    finally:
        svc.asrctl("down", check=False)


@pytest.fixture(scope="module")
def recording() -> tuple[bytes, float, str]:
    """About 135 s of real speech (English set A, then again in reverse order), as 48 kHz stereo WAV."""
    forward, places = set_a_sequence(gap=1.0)
    backward, places_back = set_a_sequence(gap=0.6, rows=english_set_a()[::-1])
    samples = np.concatenate([forward, backward])
    stereo = np.repeat(samples, 3)[:, None].repeat(2, axis=1)  # 16 -> 48 kHz, two channels
    return wav_bytes(stereo, 3 * RATE), len(samples) / RATE, " ".join(r for *_, r in places + places_back)


def test_a_long_request_is_decoded_on_both_instances(service):
    samples, places = set_a_sequence(gap=1.0)  # about 70 s: 3-4 chunks
    data, duration, reference = wav_bytes(samples, RATE), len(samples) / RATE, " ".join(r for *_, r in places)
    response = requests.post(f"{service.url}/asr", files={"audio": ("long.wav", data)},
                             data={"word_timestamps": "true"}, timeout=600)
    assert response.status_code == 200, response.text
    placed = dict(part.split("=") for part in response.headers["X-ASR-Chunks"].split(", "))
    assert set(placed) == {f"asr-{port}" for port in service.instance_ports}, placed
    body = response.json()
    assert wer([reference], [body["text"]]) < 0.1
    starts = [s["start"] for s in body["segments"]]
    words = [w for s in body["segments"] for w in s["words"]]
    assert starts == sorted(starts) and [w["start"] for w in words] == sorted(w["start"] for w in words)
    assert body["segments"][-1]["end"] > duration - 10 and all(s["end"] <= duration for s in body["segments"])


def test_a_job_survives_a_rolling_restart_and_loses_no_finished_chunk(service, recording):
    data, duration, reference = recording
    too_large = requests.post(f"{service.url}/asr", files={"audio": ("long.wav", data)}, timeout=120)
    assert too_large.status_code == 413, too_large.text
    posted = requests.post(f"{service.url}/v1/jobs", files={"audio": ("long.wav", data)},
                           data={"output": "srt"}, timeout=120)
    assert posted.status_code == 202, posted.text
    job = posted.json()
    assert posted.headers["Location"] == f"/v1/jobs/{job['id']}" and job["state"] == "queued"
    assert job["progress"]["total_seconds"] == pytest.approx(duration, abs=0.01)

    # One job may wait (job_max_queued = 1): the next is refused at once, then the waiting one cancelled.
    waiting = _wait_for(service, job["id"], lambda j: j["state"] == "running", 60)
    second = requests.post(f"{service.url}/v1/jobs", files={"audio": ("long.wav", data)}, timeout=120)
    third = requests.post(f"{service.url}/v1/jobs", files={"audio": ("long.wav", data)}, timeout=120)
    assert second.status_code == 202 and third.status_code == 503, third.text
    assert third.json()["error"]["code"] == "jobs_full" and int(third.headers["Retry-After"]) > 0
    cancelled = requests.delete(f"{service.url}/v1/jobs/{second.json()['id']}", timeout=10)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"

    store = JobStore(service.run_dir / "jobs" / "jobs.sqlite3")
    _wait_for(service, job["id"], lambda j: j["progress"]["done_seconds"] > waiting["progress"]["done_seconds"], 120)
    before = {c.idx: c.finished for c in store.chunks(job["id"]) if c.result is not None}
    assert before, "no chunk finished before the restart"
    progress: list[float] = []
    restart = threading.Thread(target=lambda: service.asrctl("restart", "--rolling", timeout=300))
    restart.start()
    final = _wait_for(service, job["id"], lambda j: j["state"] not in ("queued", "running"), 400, progress)
    restart.join(timeout=300)
    assert final["state"] == "done", final
    assert progress == sorted(progress), "progress went backwards"
    chunks = store.chunks(job["id"])
    assert all(c.result is not None for c in chunks if c.speech)
    for chunk in chunks:
        if chunk.idx in before:  # finished before the restart: kept, never decoded again
            assert chunk.finished == before[chunk.idx] and chunk.attempts == 1
    assert len({c.instance for c in chunks if c.instance}) >= 2

    # The result in any format; the JSON status carries it too.
    assert wer([reference], [final["result"]["text"]]) < 0.1
    cues = list(srt.parse(requests.get(f"{service.url}{final['result_url']}", timeout=10).text))
    assert [c.start for c in cues] == sorted(c.start for c in cues) and cues[-1].end.total_seconds() <= duration
    text = requests.get(f"{service.url}{final['result_url']}", params={"output": "txt"}, timeout=10)
    assert text.headers["Content-Type"].startswith("text/plain") and text.text.strip() == final["result"]["text"]

    status = json.loads(service.asrctl("status", "--json", check=False).stdout)
    assert status["jobs"]["done"] == 1 and status["jobs"]["cancelled"] == 1
    metrics = requests.get(f"http://127.0.0.1:{service.instance_ports[0]}/metrics", timeout=10).text
    assert 'asr_jobs{state="done"} 1.0' in metrics and 'asr_jobs{state="cancelled"} 1.0' in metrics
    assert not list((service.run_dir / "jobs" / "audio").glob("*.flac")), "finished jobs' audio was kept"

    assert requests.delete(f"{service.url}/v1/jobs/{job['id']}", timeout=10).status_code == 204
    gone = requests.get(f"{service.url}/v1/jobs/{job['id']}", timeout=10)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "job_not_found"


# About 70 s read without a pause: every cut falls inside speech, in a 30 s window.
UNBROKEN = (
    "the quick brown fox jumps over the lazy dog while seven wizards quietly pack their bags and travel "
    "north across frozen mountains toward a distant village where farmers grow pumpkins carrots and "
    "potatoes beside a river full of silver fish that glitter under the morning sun then children run "
    "along a wooden bridge laughing loudly as their grandmother bakes fresh bread for everyone in the "
    "kitchen near an old window painted green last summer by her neighbour who builds violins and "
    "repairs bicycles every weekend before visiting the library downtown to borrow novels about pirates "
    "dragons explorers and famous detectives solving mysteries in foggy harbours at midnight meanwhile "
    "a curious owl watches from the chimney counting stars until dawn arrives with golden light spilling "
    "over meadows orchards and quiet lakes where ducks paddle slowly beneath willow branches swaying gently "
    "in the cool breeze that carries the scent of lavender jasmine and freshly cut grass across the valley")


def test_speech_without_a_pause_is_joined_word_for_word_on_both_paths(service):
    # The chunks overlap at every cut and go to both instances with word times; the job runner joins
    # its stored chunks the same way. No content word of the text comes back twice, none is lost.
    samples = espeak(UNBROKEN)
    data = wav_bytes(samples, RATE)
    asr = requests.post(f"{service.url}/asr", files={"audio": ("unbroken.wav", data)}, timeout=600)
    assert asr.status_code == 200, asr.text
    assert len(asr.headers["X-ASR-Chunks"].split(", ")) == 2  # both instances took chunks
    posted = requests.post(f"{service.url}/v1/jobs", files={"audio": ("unbroken.wav", data)}, timeout=120)
    assert posted.status_code == 202, posted.text
    job = _wait_for(service, posted.json()["id"], lambda j: j["state"] not in ("queued", "running"), 400)
    assert job["state"] == "done", job
    assert job["progress"]["done_seconds"] == pytest.approx(len(samples) / RATE, abs=0.01)
    reference = normalize(UNBROKEN).split()
    once = {w for w in reference if reference.count(w) == 1 and len(w) > 3}
    for text in (asr.json()["text"], job["result"]["text"]):
        heard = normalize(text).split()
        assert not [w for w in once if heard.count(w) > 1], text   # nothing doubled at a join
        assert len(heard) >= len(reference) - 3, text              # nothing lost at one
        assert wer([UNBROKEN], [text]) <= 0.3, text
    assert normalize(asr.json()["text"]) == normalize(job["result"]["text"])  # the same chunks, the same join


def test_job_requests_are_checked_like_asr(service):
    data = spoken_wav()
    cases = {
        "not audio": ({"files": {"audio": ("a.wav", b"hello " * 100)}}, 415, "unsupported_media_type"),
        "damaged": ({"files": {"audio": ("a.wav", data[:3000])}}, 422, "audio_too_short"),
        "unknown parameter": ({"files": {"audio": ("a.wav", data)}, "data": {"speed": "2"}}, 422, "invalid_parameter"),
        "bad language": ({"files": {"audio": ("a.wav", data)}, "data": {"language": "xx"}}, 422, "invalid_parameter"),
        "no file": ({"files": {"output": (None, "txt")}}, 400, "missing_audio"),
    }
    for name, (kwargs, status, code) in cases.items():
        response = requests.post(f"{service.url}/v1/jobs", timeout=60, **kwargs)
        same_on_asr = requests.post(f"{service.url}/asr", timeout=60, **kwargs)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), name
        assert same_on_asr.json()["error"] == response.json()["error"], name
    assert requests.get(f"{service.url}/ready", timeout=5).status_code == 200


def _raw_get(port: int, path: str) -> tuple[int, dict]:
    """GET ``path`` exactly as written: ``requests`` would resolve its ``..`` before sending."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_job_id_that_is_not_ours_reaches_no_job(service):
    job_not_found = "job_not_found"
    # Through nginx: a path that climbs out of /v1/jobs/, plain or encoded, is resolved by nginx to a
    # route that is not public and answered there (one that climbs above / is malformed); it never
    # reaches an instance, whose answers below differ.
    for path in ("/v1/jobs/../../etc/passwd", "/v1/jobs/..%2F..%2Fetc%2Fpasswd"):
        assert _raw_get(service.port, path) == (404, {"error": {"code": "not_found", "message": "not found"}}), path
    status, body = _raw_get(service.port, "/v1/jobs/..%2f..%2f..%2fetc%2fpasswd")
    assert status == 400 and "malformed" in body["error"]["message"], body
    # An instance's loopback port, reached without nginx: an id that is one path segment gets to the
    # job route and is refused there as a missing job; one with an encoded slash matches no route.
    instance = service.instance_ports[0]
    for job_id in ("..", "%2E%2E", ".%2E", "0" * 32, "x", "0" * 31 + "%00"):
        status, body = _raw_get(instance, f"/v1/jobs/{job_id}")
        assert (status, body["error"]["code"]) == (404, job_not_found), (job_id, body)
        status, body = _raw_get(instance, f"/v1/jobs/{job_id}/result")
        assert (status, body["error"]["code"]) == (404, job_not_found), (job_id, body)
    for path in ("/v1/jobs/..%2F..%2Fetc%2Fpasswd", "/v1/jobs/../../etc/passwd"):
        status, body = _raw_get(instance, path)
        assert status == 404 and body["error"]["code"] == "not_found", (path, body)
    assert requests.get(f"{service.url}/ready", timeout=5).status_code == 200


@pytest.fixture(scope="module")
def spanning(tmp_path_factory):
    """The defaults: faster-whisper conditioning on previous text, spans of at most span_seconds."""
    svc = bring_up(tmp_path_factory.mktemp("spans"), 2)
    try:
        yield svc
    finally:
        svc.asrctl("down", check=False)


def test_a_long_recording_goes_in_one_conditioned_span_per_instance_on_both_paths(spanning):
    samples, places = set_a_sequence(gap=1.0)  # about 70 s: two spans of about 35 s
    data, duration, reference = wav_bytes(samples, RATE), len(samples) / RATE, " ".join(r for *_, r in places)
    asr = requests.post(f"{spanning.url}/asr", files={"audio": ("long.wav", data)}, timeout=600)
    assert asr.status_code == 200, asr.text
    placed = dict(part.split("=") for part in asr.headers["X-ASR-Chunks"].split(", "))
    assert placed == {f"asr-{port}": "1" for port in spanning.instance_ports}, placed
    posted = requests.post(f"{spanning.url}/v1/jobs", files={"audio": ("long.wav", data)}, timeout=120)
    assert posted.status_code == 202, posted.text
    job = _wait_for(spanning, posted.json()["id"], lambda j: j["state"] not in ("queued", "running"), 400)
    assert job["state"] == "done", job
    chunks = JobStore(spanning.run_dir / "jobs" / "jobs.sqlite3").chunks(posted.json()["id"])
    assert len(chunks) == 2 and len({c.instance for c in chunks}) == 2      # the job runner plans the same spans
    for text in (asr.json()["text"], job["result"]["text"]):
        assert wer([reference], [text]) < 0.1, text
    assert normalize(asr.json()["text"]) == normalize(job["result"]["text"])
    segments = asr.json()["segments"]
    assert [s["start"] for s in segments] == sorted(s["start"] for s in segments) and segments[-1]["end"] > duration - 10


def _wait_for(service, job_id: str, condition, timeout: float, progress: list | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = requests.get(f"{service.url}/v1/jobs/{job_id}", timeout=10).json()
        if progress is not None:
            progress.append(job["progress"]["done_seconds"])
        if condition(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} did not get there in {timeout} s: {job}"
        time.sleep(0.3)
