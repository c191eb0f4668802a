"""The transformers engine behind the whole service: /ready goes 503 -> 200 while the model loads, and
transcripts through nginx equal the bare engine's on real speech."""
import subprocess
import time

import pytest
import requests

from app.engines import load_engine
from app.engines.base import DecodeOptions
from app.engines.models import resolve_model
from support import BIN, JFK_REFERENCE, shared_audio, Service, clip_bytes, english_set_a, free_ports, \
    normalize, read_16k_mono, wer

pytestmark = pytest.mark.integration

def set_a_rows() -> list[dict]:
    """JFK plus the shortest set-A clips: transformers with 5 beams on 2 CPU cores is the slow engine here."""
    return sorted(english_set_a(), key=lambda r: (r["file"] != "setA/jfk.flac", r["duration_s"]))[:5]


@pytest.fixture(scope="module")
def startup(tmp_path_factory, model_cache):
    """Bring the service up with asrctl in the background and watch the instance's /ready meanwhile."""
    port, instance_port = free_ports(2)
    run_dir = tmp_path_factory.mktemp("hf") / "run"
    env = {"ASR_MODEL_CACHE": str(model_cache)}
    resolve_model("transformers", "embedded", model_cache)  # convert once, before timing start-up
    up = subprocess.Popen([str(BIN / "asrctl"), "up", "--run-dir", str(run_dir), "--engine", "transformers",
                           "--instances", "1", "--host", "127.0.0.1", "--port", str(port),
                           "--base-port", str(instance_port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**__import__("os").environ, **env})
    seen = []
    while up.poll() is None and (not seen or seen[-1][0] != 200):  # asrctl up returns once ready
        try:
            r = requests.get(f"http://127.0.0.1:{instance_port}/ready", timeout=2)
            seen.append((r.status_code, r.json().get("state"), r.headers.get("Retry-After")))
        except requests.ConnectionError:
            pass  # gunicorn not listening yet
        time.sleep(0.05)
    output, _ = up.communicate(timeout=600)
    r = requests.get(f"http://127.0.0.1:{instance_port}/ready", timeout=5)
    seen.append((r.status_code, r.json().get("state"), r.headers.get("Retry-After")))
    service = Service(run_dir, port, [instance_port])
    yield service, seen, up.returncode, output
    service.asrctl("down")


def test_ready_goes_503_then_200_during_start(startup):
    _, seen, returncode, output = startup
    assert returncode == 0, output
    codes = [code for code, _, _ in seen]
    assert codes and codes[-1] == 200 and 503 in codes, seen
    first_ready = codes.index(200)
    assert all(code == 503 for code in codes[:first_ready])
    assert all(state == "loading" and retry for code, state, retry in seen[:first_ready])
    assert "ASR service ready" in output and "curl -F audio=@" in output


def test_transcripts_through_nginx_equal_the_bare_transformers_engine(startup, model_cache):
    service, _, _, _ = startup
    rows = set_a_rows()
    responses = [service.transcribe(clip_bytes(r)) for r in rows]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    bodies = [r.json() for r in responses]
    assert {b["engine"] for b in bodies} == {"transformers"} and bodies[0]["model"] == "whisper-tiny.en"
    served = [b["text"] for b in bodies]
    engine = load_engine("transformers", resolve_model("transformers", "embedded", model_cache), "cpu",
                         cpu_threads=2)
    bare = [engine.transcribe(read_16k_mono(shared_audio(r["file"])), DecodeOptions(beam_size=5)).text
            for r in rows]
    references = [r["reference"] for r in rows]
    assert [normalize(t) for t in served] == [normalize(t) for t in bare]
    assert wer(references, served) == pytest.approx(wer(references, bare)) and wer(references, served) < 0.1
    assert normalize(served[0]) == normalize(JFK_REFERENCE)
