"""Qwen3-ASR served for real: supervisord, a gunicorn instance with the tiny Qwen3-ASR of
tests/random_qwen3_asr.py and its forced aligner, nginx in front; the recipes' own client request, every
output, the OpenAI client, /detect-language, batching through the queue, long audio, and every refusal.

The model is taught only to name the language of three clips and stop, so these tests assert
structure, times, statuses and equality between paths, never words.
"""
from __future__ import annotations

import concurrent.futures
import csv
import io
import re

import numpy as np
import openai
import pytest
import requests
import srt
import webvtt

from random_qwen3_asr import original_layout
from support import bring_up, manifest, normalize, read_16k_mono, run_asrctl, shared_audio, wav_bytes

pytestmark = pytest.mark.integration

S = 16_000
EN, ZH, DE = (shared_audio(manifest(language=code)[0]["file"]) for code in ("en", "zh", "de"))


@pytest.fixture(scope="module")
def service(qwen_models, tmp_path_factory):
    asr, aligner = qwen_models
    svc = bring_up(tmp_path_factory.mktemp("qwen"), 1, "--engine", "qwen3-asr", "--model", str(asr),
                   "--aligner-model", str(aligner), "--chunk-seconds", "20", env={"ASR_MAX_BATCH": "4"})
    yield svc
    svc.asrctl("down")


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, timeout=120)


def post(service, path, data: bytes, **params) -> requests.Response:
    return requests.post(f"{service.url}{path}", files={"audio": ("clip.wav", data)}, data=params, timeout=120)


def long_recording() -> bytes:
    """About 35 s: English, Mandarin, German and English again, each followed by a second of silence."""
    return wav_bytes(long_samples(), S)


def long_samples() -> np.ndarray:
    pause = np.zeros(S, np.float32)
    parts = [read_16k_mono(p) for p in (EN, ZH, DE, EN)]
    return np.concatenate([x for part in parts for x in (part, pause)])


def test_the_recipes_stress_client_request_works(service):
    # The core recipe's stress test: field `audio`, language=auto.
    r = post(service, "/asr", EN.read_bytes(), language="auto")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["engine"] == "qwen3-asr" and body["language"] == "en" and body["text"]
    assert body["language_probability"] is None  # the model names a language but gives no probability
    assert body["duration"] == pytest.approx(11.0, abs=0.01)
    (segment,) = body["segments"]
    assert 0 <= segment["start"] < segment["end"] <= body["duration"] and segment["text"] == body["text"]


@pytest.mark.parametrize("value, code", [("Chinese", "zh"), ("english", "en"), ("de", "de"), ("", "zh")])
def test_language_by_name_or_code_is_forced_and_reported_as_a_code(service, value, code):
    r = post(service, "/asr", ZH.read_bytes(), language=value)
    assert r.status_code == 200, r.text
    assert r.json()["language"] == code


def test_unknown_language_and_translate_are_refused_with_422(service):
    r = post(service, "/asr", EN.read_bytes(), language="Klingon")
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("language:")
    r = post(service, "/asr", EN.read_bytes(), task="translate")
    assert r.status_code == 422 and "translate" in r.json()["error"]["message"]
    assert r.json()["error"]["message"].startswith("task:")


def test_every_output_format_carries_the_long_recordings_chunks(service):
    data = long_recording()
    body = post(service, "/asr", data).json()
    assert len(body["segments"]) >= 2 and body["duration"] == pytest.approx(len(long_samples()) / S, abs=0.01)
    times = [(s["start"], s["end"]) for s in body["segments"]]
    assert times == sorted(times) and all(0 <= a < b <= body["duration"] for a, b in times)
    assert times[-1][1] > 25, "later chunks keep their absolute times"

    subs = list(srt.parse(post(service, "/asr", data, output="srt").text))
    assert [(round(s.start.total_seconds(), 3), round(s.end.total_seconds(), 3)) for s in subs] == times
    cues = webvtt.from_string(post(service, "/asr", data, output="vtt").text).captions
    assert len(cues) == len(times)
    rows = list(csv.reader(io.StringIO(post(service, "/asr", data, output="tsv").text), delimiter="\t"))
    assert rows[0] == ["start", "end", "text"] and [(int(a), int(b)) for a, b, _ in rows[1:]] == \
        [(round(a * 1000), round(b * 1000)) for a, b in times]
    assert post(service, "/asr", data, output="txt").text.strip() == body["text"]


def test_word_timestamps_from_the_forced_aligner(service):
    # The tests' aligner has random weights, so where it puts a word means nothing (and a segment is
    # cut from its first word to its last): tests/test_qwen3_asr_engine.py checks what does not depend
    # on the weights. Through the service: each segment carries its own words, no probability.
    body = post(service, "/asr", long_recording(), word_timestamps="true", language="en").json()
    assert len(body["segments"]) >= 2
    for segment in body["segments"]:
        assert _letters(" ".join(w["word"] for w in segment["words"])) == _letters(segment["text"]), segment
        assert all(w["probability"] is None for w in segment["words"])


def test_detect_language_names_the_models_language_without_a_confidence(service):
    for path, code in ((EN, "en"), (ZH, "zh"), (DE, "de")):
        r = post(service, "/detect-language", path.read_bytes())
        assert r.status_code == 200, r.text
        assert r.json() == {"language": code, "confidence": None, "language_code": code,
                            "detected_language": {"en": "english", "zh": "chinese", "de": "german"}[code]}


def test_openai_client_transcriptions_and_refused_translation(client):
    with ZH.open("rb") as f:
        assert client.audio.transcriptions.create(model="qwen3-asr", file=f, language="zh").text
    with EN.open("rb") as f:
        verbose = client.audio.transcriptions.create(model="qwen3-asr", file=f, response_format="verbose_json",
                                                     timestamp_granularities=["word", "segment"])
    assert verbose.language == "english" and verbose.words and verbose.segments
    with EN.open("rb") as f:
        srt_text = client.audio.transcriptions.create(model="qwen3-asr", file=f, response_format="srt")
    assert list(srt.parse(srt_text))
    with EN.open("rb") as f, pytest.raises(openai.UnprocessableEntityError) as refused:
        client.audio.translations.create(model="qwen3-asr", file=f)
    assert "translate" in refused.value.body["message"]


def test_concurrent_requests_batch_and_equal_one_by_one(service):
    clips = [EN.read_bytes(), ZH.read_bytes(), DE.read_bytes(), long_recording()]
    alone = [post(service, "/asr", c).json() for c in clips]
    batches_before = _batches(service)
    with concurrent.futures.ThreadPoolExecutor(len(clips)) as pool:
        together = list(pool.map(lambda c: post(service, "/asr", c).json(), clips * 2))
    assert _batches(service) - batches_before < len(together), "some requests must have shared an engine call"
    keep = ("text", "language", "segments")
    assert [{k: t[k] for k in keep} for t in together] == [{k: a[k] for k in keep} for a in alone * 2]


def _batches(service) -> float:
    text = requests.get(f"http://127.0.0.1:{service.instance_ports[0]}/metrics", timeout=5).text
    return float(re.search(r"^asr_batch_size_count(?:\{[^}]*\})? (\S+)$", text, re.M).group(1))


def test_without_an_aligner_word_timestamps_get_a_422_naming_the_setting(qwen_models, tmp_path):
    svc = bring_up(tmp_path, 1, "--engine", "qwen3-asr", "--model", str(qwen_models[0]))
    try:
        r = post(svc, "/asr", EN.read_bytes(), word_timestamps="true")
        assert r.status_code == 422 and "aligner_model" in r.json()["error"]["message"]
        r = requests.post(f"{svc.url}/v1/audio/transcriptions", files={"file": ("a.wav", EN.read_bytes())},
                          data={"response_format": "verbose_json", "timestamp_granularities[]": "word"}, timeout=60)
        assert r.status_code == 422 and "aligner_model" in r.json()["error"]["message"]
        assert post(svc, "/asr", EN.read_bytes(), output="srt").status_code == 200  # segments still work
    finally:
        svc.asrctl("down")


def test_an_original_layout_checkpoint_fails_the_start_with_the_reason(qwen_models, tmp_path):
    bad = original_layout(qwen_models[0], tmp_path / "Qwen3-ASR-original")
    run_dir = tmp_path / "run"
    from support import free_ports

    port, base = free_ports(2)
    up = run_asrctl("up", "--run-dir", str(run_dir), "--instances", "1", "--host", "127.0.0.1", "--port", str(port),
                    "--base-port", str(base), "--engine", "qwen3-asr", "--model", str(bad), check=False)
    try:
        assert up.returncode != 0
        said = up.stdout + up.stderr
        assert "failed to load its model" in said and "weights missing" in said and "-hf" in said, said
        health = requests.get(f"http://127.0.0.1:{base}/health", timeout=5).json()
        assert health["state"] == "failed" and "Qwen3-ASR-1.7B-hf" in health["error"]
    finally:
        run_asrctl("down", "--run-dir", str(run_dir), check=False)


def _letters(text: str) -> str:
    """The text without case, punctuation or spaces: the aligner splits Chinese into characters."""
    return "".join(normalize(text).split())
