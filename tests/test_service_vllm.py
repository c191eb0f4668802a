"""The vllm engine served for real: supervisord, one gunicorn instance (from .venv-vllm) that owns an
in-process vLLM engine on the tiny taught Qwen3-ASR with heads of 32, nginx in front. Eight clients at
once all get their answer, and the same one each would get alone; /detect-language and long audio go
through it as through the qwen3-asr engine. A missing vLLM is one sentence at `asrctl up`.

The model is taught only to name the language of three clips and stop: structure and equality, not words.
"""
from __future__ import annotations

import concurrent.futures
import re

import pytest
import requests

from support import REPO, bring_up, free_ports, manifest, run_asrctl, shared_audio, vllm_python

pytestmark = pytest.mark.integration

EN, ZH, DE = (shared_audio(manifest(language=code)[0]["file"]) for code in ("en", "zh", "de"))
# vLLM's CPU KV cache from 1 GiB of host memory (its default is 4): the test host is shared.
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module")
def service(qwen_models_vllm, tmp_path_factory):
    vllm_python()
    svc = bring_up(tmp_path_factory.mktemp("vllm"), 1, "--engine", "vllm", "--model", str(qwen_models_vllm[0]),
                   "--beam-size", "1", "--chunk-seconds", "20", "--max-queue", "8", env=ENV)
    yield svc
    svc.asrctl("down")


def post(service, path, data: bytes, **params) -> requests.Response:
    return requests.post(f"{service.url}{path}", files={"audio": ("clip.wav", data)}, data=params, timeout=300)


def test_the_instance_runs_the_vllm_engine_from_its_own_environment(service):
    health = requests.get(f"http://127.0.0.1:{service.instance_ports[0]}/health", timeout=5).json()
    assert health["state"] == "ready", health
    program = (service.run_dir / "supervisor" / "programs").glob("*.conf")
    commands = [line for path in program for line in path.read_text().splitlines() if line.startswith("command=")
                and "gunicorn" in line]
    assert commands == [f"command={REPO / '.venv-vllm' / 'bin' / 'gunicorn'} --config python:app.runtime.gunicorn_conf"]
    body = post(service, "/asr", EN.read_bytes()).json()
    assert body["engine"] == "vllm" and body["language"] == "en" and body["text"]


def test_eight_concurrent_clients_through_nginx_all_get_200_and_their_own_answer(service):
    clips = [EN.read_bytes(), ZH.read_bytes(), DE.read_bytes(), EN.read_bytes()] * 2
    alone = {path: post(service, "/asr", path.read_bytes()).json()["text"] for path in (EN, ZH, DE)}
    calls_before = _engine_calls(service)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: post(service, "/asr", c), clips))
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers if r.status_code != 200]
    assert [r.json()["text"] for r in answers] == [alone[p] for p in (EN, ZH, DE, EN) * 2]
    assert [r.json()["language"] for r in answers] == ["en", "zh", "de", "en"] * 2
    assert _engine_calls(service) - calls_before < 8, "waiting requests must have gone to vLLM together"


def test_detect_language_and_long_audio(service):
    for path, code in ((EN, "en"), (ZH, "zh"), (DE, "de")):
        r = post(service, "/detect-language", path.read_bytes())
        assert r.status_code == 200 and r.json()["language"] == code, r.text
    import numpy as np
    from support import read_16k_mono, wav_bytes
    pause = np.zeros(16_000, np.float32)
    long = np.concatenate([x for p in (EN, ZH, DE, EN) for x in (read_16k_mono(p), pause)])
    body = post(service, "/asr", wav_bytes(long, 16_000)).json()
    assert len(body["segments"]) >= 2 and body["segments"][-1]["end"] > 25


def _engine_calls(service) -> float:
    text = requests.get(f"http://127.0.0.1:{service.instance_ports[0]}/metrics", timeout=5).text
    return float(re.search(r"^asr_batch_size_count(?:\{[^}]*\})? (\S+)$", text, re.M).group(1))


def test_a_missing_vllm_is_one_sentence_at_asrctl_up(tmp_path):
    # .venv (asrctl's environment here) has no vLLM, and engine_environment names one that does not
    # exist either: a host where scripts/setup.sh --engine vllm never ran. Nothing is started.
    port, base = free_ports(2)
    try:
        up = run_asrctl("up", "--run-dir", str(tmp_path / "run"), "--instances", "1", "--host", "127.0.0.1",
                        "--port", str(port), "--base-port", str(base), "--engine", "vllm", "--model", str(tmp_path),
                        "--beam-size", "1", check=False, env={"ASR_ENGINE_ENVIRONMENT": str(tmp_path / "no-such-env")})
    finally:  # should it have started anything, nothing outlives the test
        run_asrctl("down", "--run-dir", str(tmp_path / "run"), check=False)
    said = (up.stdout + up.stderr).strip()
    assert up.returncode == 1 and not (tmp_path / "run" / "supervisor").exists()
    assert said == ("asrctl up: engine vllm needs vllm, which neither this environment nor "
                    f"{tmp_path / 'no-such-env'} has: scripts/setup.sh --engine vllm installs it"), said
