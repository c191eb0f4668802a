"""The vllm engine against the transformers Qwen3-ASR engine, on the same tiny taught weights (attention
heads of 32, the smallest vLLM's CPU attention runs) and the same real speech.

vLLM runs in its own environment (.venv-vllm: it pins an older transformers), so the vllm engine runs
in a child process (tests/vllm_decode.py) and this process, in .venv, runs the transformers engine as
it is served. Greedy decoding must give the same tokens, clip by clip, for auto-detected and forced
languages and a context prompt, with every clip handed to vLLM in one call; the transcripts, long audio
cut into chunks included, and the detected languages must be the same as the transformers engine's.
"""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from app.engines import load_engine
from app.engines.base import SAMPLE_RATE, DecodeOptions
from app.engines.qwen3_asr_engine import token_budget
from support import REPO, manifest, read_16k_mono, shared_audio, vllm_python

S = SAMPLE_RATE
VLLM_SECONDS = 900   # load (about 25 s here) and decoding, on two busy cores


@pytest.fixture(scope="module")
def clips() -> list[tuple[np.ndarray, str | None, str]]:
    """(audio, forced language or None, prompt): the three taught languages detected, English forced as
    German, a prompt, noise, and a recording over the 20 s chunk length."""
    speech = {code: read_16k_mono(shared_audio(manifest(language=code)[0]["file"])) for code in ("en", "zh", "de")}
    noise = (0.1 * np.random.default_rng(0).standard_normal(4 * S)).astype(np.float32)
    pause = np.zeros(S, np.float32)
    long = np.concatenate([speech["en"], pause, speech["zh"], pause, speech["de"], pause, speech["en"]])
    return [(speech["en"], None, ""), (speech["zh"], None, ""), (speech["de"], None, ""),
            (speech["en"], "de", ""), (speech["de"], None, "Guten Tag"), (noise, "fr", ""), (long, None, "")]


@pytest.fixture(scope="module")
def transformers_engine(qwen_models_vllm):
    asr, _ = qwen_models_vllm
    return load_engine("qwen3-asr", str(asr), "cpu", chunk_seconds=20)


@pytest.fixture(scope="module")
def vllm_result(qwen_models_vllm, clips, tmp_path_factory) -> dict:
    python = vllm_python()
    work = tmp_path_factory.mktemp("vllm-decode")
    request = {"clips": []}
    for i, (audio, language, prompt) in enumerate(clips):
        np.save(work / f"{i}.npy", audio)
        request["clips"].append({"audio": str(work / f"{i}.npy"), "language": language, "prompt": prompt,
                                 "budget": token_budget(len(audio) / S)})
    (work / "request.json").write_text(json.dumps(request))
    done = subprocess.run([str(python), str(REPO / "tests" / "vllm_decode.py"), str(qwen_models_vllm[0]),
                           str(work / "request.json"), str(work / "result.json")],
                          capture_output=True, text=True, timeout=VLLM_SECONDS, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(work), "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads((work / "result.json").read_text())


def greedy_tokens(engine, audio: np.ndarray, language: str | None, prompt: str) -> list[int]:
    """The transformers engine's own generate() for one clip, up to and with its end token."""
    inputs = engine.processor.apply_transcription_request(
        audio=[audio], language=[engine.code_to_name[language] if language else None], prompt=[prompt or None])
    row = engine._generate(inputs, DecodeOptions(beam_size=1), token_budget(len(audio) / S))[0].tolist()
    ends = set(engine.model.generation_config.eos_token_id)
    return next((row[: i + 1] for i, token in enumerate(row) if token in ends), row)


def test_greedy_tokens_equal_the_transformers_engines(transformers_engine, clips, vllm_result):
    # Only clips up to the chunk length: a longer one is cut first, which the transcripts below cover.
    short = [i for i, (audio, _, _) in enumerate(clips) if len(audio) <= 20 * S]
    expected = [greedy_tokens(transformers_engine, *clips[i]) for i in short]
    got = [vllm_result["tokens"][i] for i in short]
    assert all(len(t) > 3 for t in expected)   # the model says something, not just its end token
    for i, want, have in zip(short, expected, got):
        assert have == want, f"clip {i}: vLLM {have} != transformers {want}"


def test_transcripts_and_detection_equal_the_transformers_engines(transformers_engine, clips, vllm_result):
    options = [DecodeOptions(beam_size=1, language=language, initial_prompt=prompt) for _, language, prompt in clips]
    expected = [transformers_engine.transcribe(audio, o) for (audio, _, _), o in zip(clips, options)]
    got = vllm_result["transcripts"]
    assert [(t.text, t.language, [[s.start, s.end, s.text] for s in t.segments]) for t in expected] == \
           [(t["text"], t["language"], t["segments"]) for t in got]
    assert len(got[-1]["segments"]) >= 2, "the long recording comes back in chunks"
    assert [tuple(d) for d in vllm_result["detected"]] == \
           transformers_engine.detect_language([audio for audio, _, _ in clips])
    assert [got[i]["language"] for i in range(3)] == ["en", "zh", "de"]


def test_beams_are_refused_not_decoded_another_way(vllm_result):
    assert "decodes greedily" in vllm_result["refused_beams"]


def test_the_queue_hands_vllm_each_job_as_it_comes_and_gets_the_same_answers(transformers_engine, clips,
                                                                             vllm_result):
    """Through the instance's queue (continuous batching: each job begun in vLLM as it comes, answered
    when its last chunk ends) the transcripts and detected languages are the transformers engine's
    too, and a request for beams fails alone."""
    queued = vllm_result["queued"]
    assert queued["continuous"] is True
    options = [DecodeOptions(beam_size=1, language=language, initial_prompt=prompt) for _, language, prompt in clips]
    expected = [transformers_engine.transcribe(audio, o) for (audio, _, _), o in zip(clips, options)]
    assert [(t.text, t.language, [[s.start, s.end, s.text] for s in t.segments]) for t in expected] == \
           [(t["text"], t["language"], t["segments"]) for t in queued["transcripts"]]
    assert [tuple(d) for d in queued["detected"]] == transformers_engine.detect_language([a for a, _, _ in clips])
    assert "decodes greedily" in queued["refused_beams"]


def test_a_short_request_arriving_behind_a_long_one_is_answered_first(tmp_path):
    """An untaught model decodes every clip up to its token budget: 25 s of audio takes 266 steps, 1 s
    66. The short clip, submitted while the long one decodes, joins it in vLLM and ends first (one
    generate call per batch would hold it until the long one ended). The untaught model's text is
    empty: what the answers hold is the other test's (queued transcripts equal the transformers
    engine's)."""
    import random_qwen3_asr

    python = vllm_python()
    asr, _ = random_qwen3_asr.build(tmp_path / "untaught", (), head_dim=32)
    done = subprocess.run([str(python), str(REPO / "tests" / "vllm_decode.py"), "arrivals", str(asr),
                           str(tmp_path / "result.json")],
                          capture_output=True, text=True, timeout=VLLM_SECONDS, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert done.returncode == 0, done.stderr[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["finished"] == ["short", "long"], result
