"""Qwen3-Omni's thinker as a transcription model on the vllm engine, against transformers' own thinker on
the same tiny random weights (tests/random_qwen3_omni.py, run in .venv-vllm: see there why).

Greedy tokens must be equal clip by clip, with every clip in one vLLM call, for real speech and noise,
with and without a requested language and a context prompt; the engine's transcripts are the text of
those tokens, in the language asked for ("und" without one: the model names none, and none is invented);
and an instance serving the model behind nginx answers /asr and /detect-language so.
"""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import requests

from app.engines.qwen3_asr_engine import token_budget
from support import REPO, manifest, read_16k_mono, shared_audio, vllm_python

S = 16_000


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("omni")


@pytest.fixture(scope="module")
def result(work) -> tuple[list[dict], dict]:
    """Builds the model in ``work``/model, then decodes with both."""
    python = vllm_python()
    speech = {code: read_16k_mono(shared_audio(manifest(language=code)[0]["file"])) for code in ("en", "de")}
    noise = (0.1 * np.random.default_rng(0).standard_normal(3 * S)).astype(np.float32)
    cases = [(speech["en"], None, ""), (speech["de"], "de", ""), (noise, "en", "Guten Tag"), (noise, None, "")]
    clips = []
    for i, (audio, language, prompt) in enumerate(cases):
        np.save(work / f"{i}.npy", audio)
        # the budget the engine gives a clip this long: random weights never stop, so a transcript is it all
        clips.append({"audio": str(work / f"{i}.npy"), "language": language, "prompt": prompt,
                      "budget": token_budget(len(audio) / S)})
    (work / "request.json").write_text(json.dumps({"clips": clips}))
    done = subprocess.run([str(python), str(REPO / "tests" / "random_qwen3_omni.py"), str(work / "model"),
                           str(work / "request.json"), str(work / "result.json")],
                          capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(work), "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert done.returncode == 0, done.stderr[-5000:]
    return clips, json.loads((work / "result.json").read_text())


def test_greedy_tokens_equal_transformers_thinker(result):
    clips, got = result
    assert [len(row) for row in got["transformers"]] == [c["budget"] for c in clips]
    for i, (want, have) in enumerate(zip(got["transformers"], got["vllm"])):
        assert have == want, f"clip {i}: vLLM {have} != transformers {want}"
    assert len({tuple(row) for row in got["vllm"]}) == len(clips), "each clip decodes to its own tokens"


def test_the_prompt_asks_for_a_transcript_in_the_requested_language(result):
    clips, got = result
    assert "Transcribe the audio into text." in got["prompts"][0]
    assert "Transcribe the German audio into text." in got["prompts"][1]
    assert got["prompts"][2].startswith("<|im_start|>system\nGuten Tag<|im_end|>")
    assert "<|audio_start|><|audio_pad|><|audio_end|>" in got["prompts"][3]


def test_transcripts_are_the_tokens_text_in_the_language_asked_for(result):
    clips, got = result
    assert [text for text, _ in got["texts"]] == got["decoded"]
    assert [language for _, language in got["texts"]] == ["und", "de", "en", "und"]
    assert got["detected"] == [["und", None]] * len(clips)


@pytest.mark.integration
def test_an_omni_instance_behind_nginx_transcribes_in_the_language_asked_for(result, work):
    from support import bring_up

    svc = bring_up(work, 1, "--engine", "vllm", "--model", str(work / "model"), "--beam-size", "1",
                   env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        speech = shared_audio(manifest(language="de")[0]["file"]).read_bytes()
        forced = requests.post(f"{svc.url}/asr", files={"audio": ("de.wav", speech)}, data={"language": "de"},
                               timeout=300)
        assert forced.status_code == 200, forced.text
        assert forced.json()["language"] == "de" and forced.json()["engine"] == "vllm" and forced.json()["text"]
        auto = requests.post(f"{svc.url}/asr", files={"audio": ("de.wav", speech)}, timeout=300).json()
        assert auto["language"] == "und" and auto["language_probability"] is None
        detected = requests.post(f"{svc.url}/detect-language", files={"audio": ("de.wav", speech)}, timeout=300)
        assert detected.status_code == 200 and detected.json()["language"] == "und", detected.text
    finally:
        svc.asrctl("down")
