"""Async jobs that belong to a key and cannot hang, on the real service (asrctl, supervisord, nginx,
a gunicorn instance with the real model, the supervised job runner and liveness watcher).

Where a test needs an instance to misbehave, the runner's upstream list (run/upstream.json) names a
small real HTTP proxy in this process instead of the instance: it passes everything through to the
real instance, except that it answers 500 for one chunk of one job (a poison chunk), or holds one
chunk until the test lets it go.
"""
from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile

from app import jobs
from app.control.act.supervisor import SupervisorClient
from app.jobs.store import JobStore
from app.audio import peers
from app.engines.base import DecodeOptions
from app.audio.longform import Lane, decode_chunks
from support import SPOKEN, bring_up, english_set_a, read_16k_mono, shared_audio, spoken_wav, wav_bytes, wer

RATE = 16_000
KEY_A = "job-key-a-0123456789abcdef"
KEY_B = "job-key-b-0123456789abcdef"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
ATTEMPTS = 3
RETRY_SECONDS = 0.5
STALL_SECONDS = 30
JFK = spoken_wav()  # a sentence of JFK's, spoken by espeak-ng


# -- the scheduler alone (pure threads, no service) ----------------------------------------------------

def test_a_store_error_while_finishing_a_chunk_ends_the_round_instead_of_hanging_it():
    """on_done raising (the job store locked, the disk full) must release its slot: with two lanes,
    the other one waits for chunks in flight, and would wait for ever for one that never comes back."""
    calls = []

    def on_done(index, transcript, lane):
        calls.append(index)
        if index == 0:
            raise sqlite3.OperationalError("database is locked")

    def decode(index):
        time.sleep(0.05 * index)
        return index

    result, failure = {}, []

    def run():
        try:
            result.update(decode_chunks([0, 1, 2, 3], [Lane("a", 1, decode), Lane("b", 1, decode)],
                                        time.monotonic() + 30, on_done=on_done))
        except sqlite3.OperationalError as e:
            failure.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "decode_chunks hung after on_done raised"
    assert failure and "locked" in str(failure[0])
    assert 0 not in result   # the chunk whose result was not stored is not reported done


def test_a_chunk_lost_after_it_was_sent_counts_as_failed_and_one_never_sent_does_not():
    """Real sockets: an instance that died mid-chunk (accepted, then closed) or never answered (a
    read timeout) failed on the chunk (ChunkFailed, counted against it); a port nobody listens on
    never got it (Busy, not counted)."""
    import socket

    def server(behaviour):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def serve():
            connection, _ = listener.accept()
            connection.recv(65536)
            if behaviour == "die":
                connection.close()
            else:
                time.sleep(3)
                connection.close()
        threading.Thread(target=serve, daemon=True).start()
        return listener

    samples = np.zeros(RATE, np.float32)
    died, silent = server("die"), server("hang")
    with pytest.raises(peers.ChunkFailed):
        peers.decode_on(died.getsockname()[1], samples, DecodeOptions(), timeout=5)
    with pytest.raises(peers.ChunkFailed):
        peers.decode_on(silent.getsockname()[1], samples, DecodeOptions(), timeout=0.5)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with pytest.raises(peers.Busy) as nobody:
        peers.decode_on(port, samples, DecodeOptions(), timeout=5)
    assert not isinstance(nobody.value, peers.ChunkFailed)
    died.close()
    silent.close()


def test_a_streamed_job_upload_is_refused_exactly_as_asr_refuses_it(tmp_path):
    """decode_to_flac (the job path) and decode_audio (/asr) give the same error for the same bytes,
    and the same samples (to 16-bit) for good ones; nothing is left behind on a refusal."""
    from app.audio.decode import decode_audio, decode_to_flac
    from app.errors import ApiError
    from support import encode

    tone = (0.3 * np.sin(np.arange(3 * 44_100) / 44_100 * 2 * np.pi * 300)).astype(np.float32)
    stereo = np.stack([tone, -tone], axis=1)
    nan = stereo.copy()
    nan[100] = np.nan
    good = {"wav 44.1k stereo": wav_bytes(stereo, 44_100), "m4a": encode(stereo, 44_100, "ipod", "aac"),
            "flac 16k": wav_bytes(tone[:16_000], 16_000)}
    bad = {"empty": b"", "not audio": b"hello " * 100, "truncated header": wav_bytes(stereo, 44_100)[:3000],
           "too long": wav_bytes(stereo, 44_100), "nan": wav_bytes(nan, 44_100, subtype="FLOAT"),
           "damaged m4a": good["m4a"][:400]}
    destination = tmp_path / "a.flac"
    for name, data in {**good, **bad}.items():
        limit = 2.0 if name == "too long" else 600
        try:
            expected = decode_audio(data, limit)
        except ApiError as e:
            expected = (e.status, e.code)
        try:
            got = decode_to_flac(io.BytesIO(data), destination, limit)
        except ApiError as e:
            got = (e.status, e.code)
        if isinstance(expected, tuple):
            assert got == expected, name
            assert not list(tmp_path.iterdir()), f"{name}: left {list(tmp_path.iterdir())}"
        else:
            samples, _ = soundfile.read(str(destination), dtype="float32")
            assert got.samples == len(expected.samples) == len(samples), name
            assert np.abs(samples - np.round(expected.samples * 32767) / 32767).max() <= 2 / 32768, name
            destination.unlink()


def test_without_api_keys_jobs_have_no_owner_and_are_not_listed(tmp_path, capsys):
    from app.routes import create_app
    from app.config import load_settings

    app = create_app(load_settings(None, overrides={"run_dir": str(tmp_path)}), load_in_background=False)
    try:
        client = app.test_client()
        posted = client.post("/v1/jobs", data={"audio": (io.BytesIO(JFK), "a.wav")}, content_type="multipart/form-data")
        assert posted.status_code == 202, posted.get_json()
        assert client.get(f"/v1/jobs/{posted.get_json()['id']}").status_code == 200
        assert JobStore(tmp_path / "jobs" / "jobs.sqlite3").get(posted.get_json()["id"]).owner == ""
        listing = client.get("/v1/jobs")
        assert listing.status_code == 403 and listing.get_json()["error"]["code"] == "listing_needs_api_keys"

        # The database unreadable (a directory in its place): a 500, logged by the job's ref only.
        database = tmp_path / "jobs" / "jobs.sqlite3"
        database.rename(tmp_path / "moved.sqlite3")
        database.mkdir()
        job_id = posted.get_json()["id"]
        broken = client.get(f"/v1/jobs/{job_id}")
        logged = capsys.readouterr().out
        assert "OperationalError" in logged and job_id not in logged and jobs.ref(job_id) in logged
        assert broken.status_code == 500 and broken.get_json()["error"]["code"] == "internal_error"
    finally:
        app.extensions["asr_instance"].queue.stop()


# -- the real service ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jobs")
    keys = tmp / "api-keys"
    keys.write_text(f"{KEY_A}\n{KEY_B}\n")
    config = tmp / "asr-test.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in {
        # Chunks of 10 s, not spans: a job of a few chunks, one of them poisoned.
        "api_keys_file": str(keys), "chunk_seconds": 10.0, "span_seconds": 0.0, "job_chunk_attempts": ATTEMPTS,
        "job_retry_seconds": RETRY_SECONDS, "job_runner_stall_seconds": STALL_SECONDS}.items()))
    svc = bring_up(tmp, 1, "--config", str(config))
    try:
        yield svc
    finally:
        svc.asrctl("down", check=False)


@pytest.fixture(scope="module")
def speech() -> tuple[bytes, str]:
    """About 27 s of real speech (three chunks of at most 10 s), as 16 kHz WAV, and its reference."""
    rows = [r for r in english_set_a() if r["duration_s"] <= 11][:4]
    pieces, reference = [], []
    for row in rows:
        pieces += [read_16k_mono(shared_audio(row["file"])), np.zeros(RATE, np.float32)]
        reference.append(row["reference"])
    return wav_bytes(np.concatenate(pieces), RATE), " ".join(reference)


class Proxy:
    """A real HTTP server on loopback ports (one per lane) in front of the real instance: a poison
    chunk answers 500, a held chunk waits for ``release``; everything else passes through."""

    def __init__(self, instance_port: int, lanes: int = 2):
        self.target = f"http://127.0.0.1:{instance_port}"
        self.poison: str | None = None        # request id ("job-<ref>-<index>") answered 500
        self.hold = lambda request_id: False  # which request to hold (once) until release is set
        self.held, self.release = threading.Event(), threading.Event()
        self.poisoned: list[float] = []       # when each 500 was answered
        self.passed: list[str] = []           # request ids passed through
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                upstream = requests.get(proxy.target + self.path, timeout=10)
                self._answer(upstream.status_code, upstream.content, upstream.headers.get("Content-Type", ""))

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request_id = self.headers.get("X-Request-ID", "")
                if proxy.poison and request_id == proxy.poison:
                    proxy.poisoned.append(time.monotonic())
                    self._answer(500, b'{"error": {"code": "internal", "message": "poisoned"}}', "application/json")
                    return
                if not proxy.held.is_set() and proxy.hold(request_id):
                    proxy.held.set()
                    proxy.release.wait(120)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "x-request-id", "x-asr-chunk")}
                upstream = requests.post(proxy.target + self.path, data=body, headers=headers, timeout=300)
                proxy.passed.append(request_id)
                self._answer(upstream.status_code, upstream.content, upstream.headers.get("Content-Type", ""))

            def _answer(self, status: int, body: bytes, content_type: str):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(lanes)]
        for server in self.servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @property
    def ports(self) -> list[int]:
        return [s.server_address[1] for s in self.servers]

    def close(self):
        self.release.set()
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def proxy(service):
    """The runner's upstream list pointed at a Proxy with two lanes; put back afterwards."""
    upstream = service.run_dir / "upstream.json"
    original = upstream.read_text()
    p = Proxy(service.instance_ports[0])
    upstream.write_text(json.dumps([{"name": f"proxy-{port}", "port": port} for port in p.ports]))
    try:
        yield p
    finally:
        upstream.write_text(original)
        p.close()


def post_job(service, data: bytes, headers=A, **params) -> dict:
    response = requests.post(f"{service.url}/v1/jobs", files={"audio": ("a.wav", data)},
                             data={"language": "en", **params}, headers=headers, timeout=120)
    assert response.status_code == 202, response.text
    return response.json()


def wait_for(service, job_id: str, condition, timeout: float, headers=A) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = requests.get(f"{service.url}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
        if condition(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} did not get there in {timeout} s: {job}"
        time.sleep(0.3)


def finished(job: dict) -> bool:
    return job["state"] not in ("queued", "running")


def store(service) -> JobStore:
    return JobStore(service.run_dir / "jobs" / "jobs.sqlite3")


def runner_pid(service) -> int:
    client = SupervisorClient(service.run_dir / "supervisor.sock")
    info = client.process("jobs")
    assert info["statename"] == "RUNNING", info
    return info["pid"]


def test_a_job_is_visible_only_to_the_key_that_created_it_and_its_id_is_never_logged(service):
    job = post_job(service, JFK)
    job_id, url = job["id"], f"{service.url}/v1/jobs/{job['id']}"
    for method, path in (("get", ""), ("get", "/result"), ("delete", "")):
        other = requests.request(method, url + path, headers=B, timeout=10)
        assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found", (method, path)
    assert requests.get(f"{service.url}/v1/jobs", headers=B, timeout=10).json() == {"jobs": []}
    assert [j["id"] for j in requests.get(f"{service.url}/v1/jobs", headers=A, timeout=10).json()["jobs"]] == [job_id]
    assert requests.get(url, timeout=10).status_code == 401                   # no key: nginx refuses
    # The instance checks the key too: its loopback port can be reached without nginx.
    direct = f"http://127.0.0.1:{service.instance_ports[0]}/v1/jobs/{job_id}"
    assert requests.get(direct, timeout=10).status_code == 401
    assert requests.get(direct, headers={"Authorization": "Bearer not-a-key-0123456789"}, timeout=10).status_code == 401
    assert requests.get(direct, headers=B, timeout=10).status_code == 404

    done = wait_for(service, job_id, finished, 180)
    assert done["state"] == "done" and wer([SPOKEN], [done["result"]["text"]]) < 0.1
    assert requests.get(url + "/result", headers=B, timeout=10).status_code == 404
    assert requests.delete(url, headers=B, timeout=10).status_code == 404
    assert requests.get(url + "/result", headers=A, params={"output": "txt"}, timeout=10).status_code == 200
    assert requests.delete(url, headers=A, timeout=10).status_code == 204
    assert requests.get(url, headers=A, timeout=10).status_code == 404

    # nginx refuses a body announced too large with an error line quoting the request line, id and all.
    import http.client
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    connection.putrequest("POST", f"/v1/jobs/{job_id}")
    connection.putheader("Content-Length", str(10**12))
    connection.endheaders()
    assert connection.getresponse().status == 413
    connection.close()

    # No log holds the id; nginx's access line and the instance's line name the job by its short hash.
    time.sleep(0.5)
    logs = service.run_dir / "logs"
    for path in logs.glob("*.log"):
        assert job_id not in path.read_text(), f"{path.name} holds a job id in clear"
    ref = jobs.ref(job_id)
    nginx = [json.loads(line) for line in (logs / "nginx.log").read_text().splitlines() if line.startswith("{")]
    assert any(line["uri"] == f"/v1/jobs/job-{ref}/result?output=txt" and line["status"] == 200 for line in nginx)
    instance = [json.loads(line) for line in (logs / f"asr-{service.instance_ports[0]}.log").read_text().splitlines()
                if line.startswith("{")]
    assert any(line.get("job") == ref and line.get("method") == "DELETE" and line["status"] == 204 for line in instance)
    assert any(line.get("request_id", "").startswith(f"job-{ref}-") for line in instance)   # the runner's chunks



def test_a_poison_chunk_fails_its_job_within_the_attempt_limit_and_the_next_job_completes(service, speech, proxy):
    data, reference = speech
    poisoned = post_job(service, data)
    proxy.poison = f"job-{jobs.ref(poisoned['id'])}-1"
    following = post_job(service, data, output="srt")

    failed = wait_for(service, poisoned["id"], finished, 240)
    assert failed["state"] == "failed", failed
    rows = store(service).chunks(poisoned["id"])
    span = f"{rows[1].start / RATE:.1f}-{rows[1].end / RATE:.1f} s"
    assert f"chunk 1 ({span})" in failed["error"] and "500" in failed["error"], failed["error"]
    assert len(proxy.poisoned) == ATTEMPTS and rows[1].failures == ATTEMPTS
    gaps = np.diff(proxy.poisoned)
    assert gaps[0] >= RETRY_SECONDS * 0.9 and gaps[1] >= 2 * RETRY_SECONDS * 0.9, gaps  # backed off, doubling
    # The failed job keeps its audio (for a retry); the chunks that were decoded stay stored.
    assert jobs.audio_path(_settings(service), poisoned["id"]).exists()
    assert rows[0].result is not None and rows[2].result is not None

    done = wait_for(service, following["id"], finished, 240)
    assert done["state"] == "done", done
    assert wer([reference], [done["result"]["text"]]) < 0.15, done["result"]["text"]
    time.sleep(1)
    assert len(proxy.poisoned) == ATTEMPTS       # nobody tries the failed job's chunk again


def test_a_store_write_that_raises_does_not_hang_the_runner(service, speech, proxy):
    """The job's last chunk is held in the proxy until its other chunks are stored, so the other lane
    waits for it; then the database is locked past the runner's store timeout (10 s) and the chunk let
    go: its transcript cannot be stored. The round must end (not leave that lane waiting for ever),
    the runner pause and try again, and the job complete, all in the same runner process."""
    data, reference = speech
    pid = runner_pid(service)
    job = post_job(service, data)
    s, ref = store(service), jobs.ref(job["id"])

    def last_chunk(request_id: str) -> bool:
        rows = [r for r in s.chunks(job["id"]) if r.end - r.start >= RATE // 10]
        return bool(rows) and request_id == f"job-{ref}-{rows[-1].idx}"

    proxy.hold = last_chunk
    assert proxy.held.wait(120), "the runner never sent the last chunk"
    deadline = time.monotonic() + 120
    while sum(r.result is None for r in s.chunks(job["id"]) if r.end - r.start >= RATE // 10) > 1:
        assert time.monotonic() < deadline, "the other chunks were never stored"
        time.sleep(0.2)
    db = sqlite3.connect(service.run_dir / "jobs" / "jobs.sqlite3", isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    proxy.release.set()
    time.sleep(14)
    db.execute("ROLLBACK")
    db.close()

    done = wait_for(service, job["id"], finished, 240)
    assert done["state"] == "done" and wer([reference], [done["result"]["text"]]) < 0.15, done
    assert runner_pid(service) == pid, "the runner was restarted: it had stalled"
    log = (service.run_dir / "logs" / "jobs.log").read_text()
    assert "job store failed (OperationalError: database is locked)" in log
    assert job["id"] not in log


def test_asrctl_jobs_lists_cancels_and_retries(service, proxy):
    s = store(service)
    failed = [j for j in s.jobs() if j.state == "failed" and j.error.startswith("chunk 1 (")]
    if not failed:
        shared_audio("manifest.jsonl")  # the poison test speaks the real speech: skipped without it
    assert failed, "needs the poisoned job of the poison test"
    job = failed[0]
    ref = jobs.ref(job.id)
    listing = service.asrctl("jobs").stdout
    line = next(line for line in listing.splitlines() if line.startswith(ref))
    assert "failed" in line and "chunk 1 (" in line and job.id not in listing
    assert json.loads(service.asrctl("jobs", "--json").stdout)[0]["state"] in ("done", "failed")

    # Retry: the poison is gone now; only the chunk that failed is decoded again.
    before = {c.idx: c.finished for c in s.chunks(job.id) if c.result is not None}
    retried = service.asrctl("jobs", "retry", ref)
    assert f"job {ref} queued again" in retried.stdout and "the job runner takes it in turn" in retried.stdout
    done = wait_for(service, job.id, finished, 240)
    assert done["state"] == "done", done
    after = {c.idx: c.finished for c in s.chunks(job.id) if c.result is not None}
    assert all(after[i] == t for i, t in before.items()) and set(after) - set(before) == {1}
    again = service.asrctl("jobs", "retry", ref, check=False)
    assert again.returncode != 0 and "only a failed job can be retried" in again.stderr

    # Cancel: a job that waits (the runner stopped for it), by its id.
    client = SupervisorClient(service.run_dir / "supervisor.sock")
    client.stop("jobs")
    try:
        waiting = post_job(service, JFK)
        cancelled = service.asrctl("jobs", "cancel", waiting["id"])
        assert f"job {jobs.ref(waiting['id'])} cancelled (it was queued)" in cancelled.stdout
        state = requests.get(f"{service.url}/v1/jobs/{waiting['id']}", headers=A, timeout=10).json()["state"]
        assert state == "cancelled"
        assert not jobs.audio_path(_settings(service), waiting["id"]).exists()
        twice = service.asrctl("jobs", "cancel", waiting["id"], check=False)
        assert twice.returncode != 0 and "nothing to cancel" in twice.stderr
        unknown = service.asrctl("jobs", "cancel", "0123456789ab", check=False)
        assert unknown.returncode != 0 and "no job" in unknown.stderr
    finally:
        client.start("jobs")


def test_a_200_mb_upload_stays_within_the_memory_bound(service, tmp_path):
    """The instance's peak memory (VmHWM, reset to its resident memory before the first) grows by at
    most the decoded 16 kHz mono audio plus 64 MB over three 10-minute uploads in a row: a 48 kHz
    stereo float WAV (230 MB) as multipart and as a raw body, and an AAC m4a (FFmpeg's path)."""
    seconds, rate = 600, 48_000
    wav = tmp_path / "long.wav"
    generator = np.random.default_rng(7)
    with soundfile.SoundFile(str(wav), "w", rate, 2, format="WAV", subtype="FLOAT") as f:
        t = np.arange(rate * 10) / rate
        for _ in range(seconds // 10):
            tone = 0.2 * np.sin(2 * np.pi * 440 * t)
            f.write(np.stack([tone, tone], axis=1) + 0.05 * generator.standard_normal((len(t), 2)))
    assert wav.stat().st_size > 200 * 1024 * 1024
    boundary = uuid.uuid4().hex
    body = tmp_path / "body"
    with body.open("wb") as out, wav.open("rb") as source:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="long.wav"\r\n'
                  f"Content-Type: audio/wav\r\n\r\n".encode())
        while block := source.read(1 << 20):
            out.write(block)
        out.write(f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"vad_filter\"\r\n\r\ntrue\r\n"
                  f"--{boundary}--\r\n".encode())
    m4a = tmp_path / "long.m4a"   # FFmpeg's path (PyAV): the same bound for a compressed container
    import av
    with av.open(str(m4a), "w", format="ipod") as container:
        stream = container.add_stream("aac", rate=rate, layout="stereo")
        t = np.arange(rate * 10) / rate
        for _ in range(seconds // 10):
            block = np.stack([0.2 * np.sin(2 * np.pi * 440 * t)] * 2).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
            frame.rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    worker = _instance_worker(service)
    decoded_mb = seconds * RATE * 4 / 2**20
    client = SupervisorClient(service.run_dir / "supervisor.sock")
    client.stop("jobs")   # the jobs are cancelled at once: the runner need not decode 10 minutes of tone
    try:
        (Path("/proc") / str(worker) / "clear_refs").write_text("5")   # VmHWM := VmRSS now
        before = _memory_mb(worker, "VmHWM")
        for name, upload, content_type in (("multipart", body, f"multipart/form-data; boundary={boundary}"),
                                           ("raw", wav, "audio/wav"), ("m4a", m4a, "audio/mp4")):
            with upload.open("rb") as f:
                response = requests.post(f"{service.url}/v1/jobs", data=f, timeout=600,
                                         headers={**A, "Content-Type": content_type})
            grown = _memory_mb(worker, "VmHWM") - before
            assert response.status_code == 202, response.text
            job = response.json()
            assert job["progress"]["total_seconds"] == pytest.approx(seconds, abs=0.1)
            assert requests.delete(f"{service.url}/v1/jobs/{job['id']}", headers=A, timeout=10).status_code == 200
            print(f"after {name}: peak memory grew {grown:.1f} MB in all, this one a {upload.stat().st_size / 2**20:.0f} MB upload "
                  f"(bound {decoded_mb:.1f} + 64 MB)")
            assert grown <= decoded_mb + 64, f"{name}: peak grew {grown:.1f} MB"
        assert not list((service.run_dir / "jobs" / "uploads").iterdir()), "an upload was left on disk"
    finally:
        client.start("jobs")


def test_a_stalled_runner_is_restarted_by_the_watcher(service):
    pid = runner_pid(service)
    os.kill(pid, signal.SIGSTOP)   # frozen: alive to supervisord, silent to the watcher
    try:
        deadline = time.monotonic() + STALL_SECONDS + 60
        while time.monotonic() < deadline:
            info = SupervisorClient(service.run_dir / "supervisor.sock").process("jobs")
            if info["statename"] == "RUNNING" and info["pid"] != pid:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the watcher did not restart the stalled job runner")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    watcher = (service.run_dir / "logs" / "watcher.log").read_text()
    assert f"job runner (pid {pid}) has not beaten" in watcher
    # The new runner beats, and takes jobs.
    deadline = time.monotonic() + 30
    while (jobs.last_beat(service.run_dir / "jobs" / "runner.heartbeat") or (0, 0))[0] != info["pid"]:
        assert time.monotonic() < deadline, "the new runner never beat"
        time.sleep(0.5)
    job = post_job(service, JFK)
    assert wait_for(service, job["id"], finished, 180)["state"] == "done"


def _settings(service):
    from app.config import load_settings

    return load_settings(service.run_dir / "asr.toml")


def _instance_worker(service) -> int:
    """The gunicorn worker (the process holding the model) of the service's one instance."""
    import psutil

    master = SupervisorClient(service.run_dir / "supervisor.sock").process(f"asr-{service.instance_ports[0]}")["pid"]
    children = psutil.Process(master).children()
    assert len(children) == 1, children
    return children[0].pid


def _memory_mb(pid: int, field: str) -> float:
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for pid {pid}")
