"""The whole service for real: asrctl brings up supervisord, 2 gunicorn instances and nginx on loopback
ports with the embedded model; clients talk to nginx only."""
import collections
import json
import subprocess

import numpy as np
import pytest
import requests

from app.engines.models import embedded_ct2_dir
from support import (
    BIN, JFK_REFERENCE, as_an_instance, bring_up, clip_bytes, encode, english_set_a, normalize,
    SPOKEN, espeak, shared_audio, spoken_wav, wav_bytes, wer,
)

pytestmark = pytest.mark.integration
MAX_AUDIO_SECONDS = 60  # small, so the too-long and too-large cases are cheap to send
BARE_SET_A = """
import json, sys
from pathlib import Path
from app.audio.decode import decode_audio
from app.engines import load_engine
from app.engines.base import DecodeOptions
engine = load_engine("ctranslate2", sys.argv[1], "cpu", "int8", threads)
print(json.dumps([engine.transcribe(decode_audio(Path(f).read_bytes(), 600).samples, DecodeOptions(beam_size=5)).text
                  for f in sys.argv[2:]]))
"""


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = bring_up(tmp_path_factory.mktemp("svc"), 2, "--weights", "2,1",
                   "--max-audio-seconds", str(MAX_AUDIO_SECONDS))
    yield svc
    svc.asrctl("down")


@pytest.fixture(scope="module")
def set_a_through_nginx(service):
    rows = english_set_a()
    return rows, [service.transcribe(clip_bytes(r), filename=r["file"].split("/")[-1]) for r in rows]


def test_jfk_through_nginx(service):
    response = service.transcribe(shared_audio("setA/jfk.flac").read_bytes(), filename="jfk.flac")
    assert response.status_code == 200, response.text
    body = response.json()
    assert normalize(body["text"]) == normalize(JFK_REFERENCE)
    assert body["language"] == "en" and body["duration"] == pytest.approx(11.0, abs=0.01)
    assert body["model"] == "whisper-tiny.en" and body["engine"] == "ctranslate2"
    assert body["instance"] in {f"asr-{p}" for p in service.instance_ports}
    assert body["processing_time"] > 0
    starts = [s["start"] for s in body["segments"]]
    assert starts == sorted(starts) and body["segments"][-1]["end"] <= 11.0 + 0.01
    assert " ".join(s["text"] for s in body["segments"]) == body["text"]


def test_set_a_word_error_rate_equals_the_bare_engine(set_a_through_nginx):
    rows, responses = set_a_through_nginx
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    served = [r.json()["text"] for r in responses]
    # The bare engine: the same model, precision and beam on one core with one thread, in a child started
    # as asrctl starts an instance (``as_an_instance``). Not this process: numpy's OpenBLAS sized its
    # thread pool when numpy loaded, and on some CPUs the features' last bits then decide a word (a
    # Zen 5: "go forward", "Claflin" with two threads, "Go forward", "Klafflin" with one).
    bare = as_an_instance(BARE_SET_A, str(embedded_ct2_dir()), *[str(shared_audio(r["file"])) for r in rows])
    references = [r["reference"] for r in rows]
    assert wer(references, served) == pytest.approx(wer(references, bare))
    assert [normalize(t) for t in served] == [normalize(t) for t in bare]
    assert wer(references, served) < 0.05  # tiny.en int8, beam 5, on set A measures 0.009


def test_both_instances_serve_roughly_by_weight(service, set_a_through_nginx):
    _, responses = set_a_through_nginx
    assert {r.json()["instance"] for r in responses} == {f"asr-{p}" for p in service.instance_ports}
    served_by = collections.Counter(
        requests.get(f"{service.url}/health", timeout=5).headers["X-ASR-Instance"] for _ in range(60))
    heavy, light = (f"asr-{p}" for p in service.instance_ports)  # weights 2 and 1
    assert served_by[heavy] == pytest.approx(40, abs=6) and served_by[light] == pytest.approx(20, abs=6)


def test_upload_forms_clients_use(service):
    jfk = spoken_wav()
    for field in ("audio", "audio_file", "file"):
        assert service.transcribe(jfk, field=field).status_code == 200
    raw = requests.post(f"{service.url}/asr", data=jfk, headers={"Content-Type": "audio/wav"}, timeout=60)
    assert normalize(raw.json()["text"]) == normalize(SPOKEN)
    txt = service.transcribe(jfk, output="txt")
    assert txt.headers["Content-Type"].startswith("text/plain")
    assert normalize(txt.text) == normalize(SPOKEN)
    query = requests.post(f"{service.url}/asr?output=txt&language=en", files={"audio": jfk}, timeout=60)
    assert query.text.endswith("\n") and normalize(query.text) == normalize(SPOKEN)


@pytest.mark.parametrize("container, codec", [("mp3", "libmp3lame"), ("ipod", "aac"), ("ogg", "libopus")])
def test_compressed_uploads_transcribe(service, container, codec):
    import soxr
    samples = espeak(SPOKEN, voice="en", speed=150)
    rate = 48000 if codec == "libopus" else 44100
    data = encode(soxr.resample(samples, 16000, rate), rate, container, codec)
    response = service.transcribe(data, filename=f"speech.{container}")
    assert response.status_code == 200, response.text
    assert wer([SPOKEN], [response.json()["text"]]) < 0.1


def test_request_id_passes_through_nginx(service):
    jfk = spoken_wav()
    given = requests.post(f"{service.url}/asr", files={"audio": jfk}, headers={"X-Request-ID": "abc-123"}, timeout=60)
    assert given.json()["request_id"] == "abc-123" and given.headers["X-Request-ID"] == "abc-123"
    generated = service.transcribe(jfk).json()["request_id"]
    assert len(generated) == 32 and generated != "abc-123"  # nginx's $request_id


def _bad_requests():
    silence = np.zeros(16000 * (MAX_AUDIO_SECONDS + 5), np.float32)
    return {
        "no file": ({"files": {"other": ("a.wav", b"x")}}, 400, "missing_audio"),
        "no body": ({}, 400, "missing_audio"),
        "empty file": ({"files": {"audio": ("a.wav", b"")}}, 400, "empty_audio"),
        "two files": ({"files": [("audio", ("a.wav", b"1")), ("file", ("b.wav", b"2"))]}, 400, "multiple_files"),
        "text named .wav": ({"files": {"audio": ("../../etc/passwd.wav", b"hello world\n" * 50)}}, 415,
                            "unsupported_media_type"),
        "json body": ({"json": {"audio": "x"}}, 415, "unsupported_media_type"),
        "header only": ({"files": {"audio": ("a.wav", wav_bytes(np.zeros(1000, np.float32), 16000)[:44])}}, 422,
                        "audio_too_short"),
        "damaged flac": ({"files": {"audio": ("a.flac", b"fLaC" + bytes(range(256)) * 8)}}, 422, None),
        "too long": ({"files": {"audio": ("a.wav", wav_bytes(silence, 16000))}}, 413, "audio_too_long"),
        "bad output": ({"files": {"audio": ("a.wav", spoken_wav())},
                        "data": {"output": "pdf"}}, 422, "invalid_parameter"),
        "language english-only model cannot do": (
            {"files": {"audio": ("a.wav", spoken_wav())},
             "data": {"language": "de"}}, 422, "invalid_parameter"),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_input_gets_a_clean_4xx_and_instances_stay_ready(service, case):
    kwargs, status, code = _bad_requests()[case]
    response = requests.post(f"{service.url}/asr", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["message"] and (code is None or error["code"] == code)
    assert all(service.instance_ready(p) == 200 for p in service.instance_ports)


def test_upload_over_the_size_limit_is_refused_by_nginx(service):
    settings_limit = int((service.run_dir / "nginx" / "nginx.conf").read_text()
                         .split("client_max_body_size ")[1].split(";")[0])
    response = requests.post(f"{service.url}/asr", data=b"\0" * (settings_limit + 1),
                             headers={"Content-Type": "audio/wav"}, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_health_and_ready_describe_each_instance(service):
    for port in service.instance_ports:
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        assert health["port"] == port and health["instance"] == f"asr-{port}"
        assert health["device"] == "cpu" and health["cpu_cores"] and health["pid"] > 0
        assert health["state"] == "ready" and health["model_load_seconds"] > 0
        assert requests.get(f"http://127.0.0.1:{port}/ready", timeout=5).json()["ready"] is True
    # Drain switches exist on the loopback port only, never through nginx.
    assert requests.post(f"{service.url}/admin/drain", timeout=5).status_code == 404


def test_supervisorctl_and_asrctl_status_list_the_instances(service):
    out = subprocess.run([str(BIN / "supervisorctl"), "-c", str(service.run_dir / "supervisor" / "supervisord.conf"),
                          "status"], capture_output=True, text=True).stdout
    for name in [f"asr-{p}" for p in service.instance_ports] + ["nginx"]:
        assert any(line.startswith(name) and "RUNNING" in line for line in out.splitlines()), out
    import json
    status = json.loads(service.asrctl("status", "--json").stdout)
    rows = {r["name"]: r for r in status["instances"]}
    for port in service.instance_ports:
        row = rows[f"asr-{port}"]
        assert row["port"] == port and row["state"] == "RUNNING" and row["ready"] is True
        assert row["device"].startswith("cpu:") and row["pid"] > 0 and row["uptime_seconds"] >= 0


def test_drain_switch_controls_readiness(service):
    """Readiness follows the drain switch; undraining restores it."""
    port = service.instance_ports[1]
    assert requests.post(f"http://127.0.0.1:{port}/admin/drain", timeout=5).json()["state"] == "draining"
    ready = requests.get(f"http://127.0.0.1:{port}/ready", timeout=5)
    assert ready.status_code == 503 and ready.json()["state"] == "draining" and "Retry-After" in ready.headers
    assert requests.post(f"http://127.0.0.1:{port}/admin/undrain", timeout=5).json()["state"] == "ready"
    assert service.instance_ready(port) == 200


def test_metrics_count_requests_audio_and_queue(service, set_a_through_nginx):
    from prometheus_client.parser import text_string_to_metric_families

    totals = collections.Counter()
    for port in service.instance_ports:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "asr_requests_total" and sample.labels == {"route": "/asr", "status": "200"}:
                    totals["ok"] += sample.value
                elif sample.name in ("asr_audio_seconds_total", "asr_instance_ready", "asr_queue_depth",
                                     "asr_model_load_seconds", "asr_requests_in_flight"):
                    totals[sample.name] += sample.value
    rows, _ = set_a_through_nginx
    assert totals["ok"] >= len(rows)
    assert totals["asr_audio_seconds_total"] >= sum(r["duration_s"] for r in rows) - 0.1
    assert totals["asr_instance_ready"] == 2 and totals["asr_queue_depth"] == 0
    assert totals["asr_requests_in_flight"] == 0 and totals["asr_model_load_seconds"] > 0
