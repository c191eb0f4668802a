"""The GPU self-check on a CPU host: the script's "no GPU" exit, and its Python harness run small on CPU
(the real stack with two instances, random weights built in place, the batching measurement, the
report), so what runs on a GPU has run before."""
import json
import os
import subprocess
import sys

import pytest

from support import REPO

pytestmark = pytest.mark.integration
HAS_GPU = subprocess.run("nvidia-smi -L", shell=True, capture_output=True).returncode == 0


@pytest.mark.skipif(HAS_GPU, reason="this host has a GPU: the script would run the real check")
def test_the_script_says_no_gpu_and_exits_with_its_own_code():
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh")], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "no GPU" in result.stdout and "nothing checked" in result.stdout


def _harness(tmp_path, *args):
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "app.selfcheck", "--report", str(report), *args],
                            capture_output=True, text=True, timeout=420, cwd=REPO,
                            env={**os.environ, "ASR_MODEL_CACHE": str(tmp_path / "cache")})
    return result, json.loads(report.read_text())


def test_harness_on_cpu_brings_up_the_stack_and_measures_batching(tmp_path):
    result, report = _harness(tmp_path, "--device", "cpu", "--engines", "ctranslate2", "--shape", "test",
                              "--qwen-shape", "none", "--clips", "3", "--clip-seconds", "1", "--deadline", "300")
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["passed"] and all(c["ok"] for c in report["checks"])
    names = [c["name"] for c in report["checks"]]
    assert {"ctranslate2: asrctl up", "ctranslate2: both instances /ready", "ctranslate2: JFK through nginx",
            "ctranslate2: asrctl down", "batching: every clip transcribed"} <= set(names)
    assert {"name": "qwen3-asr batching", "reason": "--qwen-shape none"} in report["skipped"]
    stack = report["stacks"]["ctranslate2"]
    assert len(stack["instances"]) == 2 and {i["device"] for i in stack["instances"]} == {"cpu"}
    assert stack["up_seconds"] > 0 and "ask not what your country" in stack["jfk"]["text"]
    assert stack["status"]["running"] is True
    batching = report["batching"]
    assert set(batching["runs"]) == {"1", "8"} and batching["speedup"] > 0
    assert batching["runs"]["1"]["batch_sizes"] == [1, 1, 1]
    assert max(batching["runs"]["8"]["batch_sizes"]) > 1           # the queue really batched
    assert "goal" not in batching                                  # the 5x goal is for large-v3 on a GPU
    assert report["host"]["nvml_error"] and report["host"]["torch"]["version"]


def test_harness_asked_for_cuda_on_a_cpu_host_fails_its_checks_in_the_report(tmp_path):
    result, report = _harness(tmp_path, "--device", "cuda", "--engines", "", "--shape", "none",
                              "--qwen-shape", "none")
    assert result.returncode == 1 and "FAILED: NVML sees a GPU" in result.stdout
    assert report["passed"] is False and report["host"]["gpus"] == []


def test_the_large_v3_shape_is_whisper_large_v3s():
    """The batching measurement's random model has large-v3's parameter count (1.54 B, counted on
    torch's meta device: no memory, no time) and its 128 mel bins."""
    import torch
    from transformers import WhisperForConditionalGeneration

    from app.selfcheck.random_whisper import whisper_config

    config = whisper_config("large-v3")
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 1_543_490_560) / 1_543_490_560 < 0.001, params   # openai/whisper-large-v3
    assert config.num_mel_bins == 128 and config.d_model == 1280 and config.encoder_layers == 32


def test_harness_on_cpu_serves_the_vllm_engine_from_its_own_environment(tmp_path):
    """The self-check's vLLM stage, rehearsed: two vLLM instances from .venv-vllm on the random tiny
    Qwen3-ASR the harness builds, greedy, through nginx."""
    from support import vllm_python

    vllm_python()
    result, report = _harness(tmp_path, "--device", "cpu", "--engines", "vllm", "--shape", "none",
                              "--qwen-shape", "tiny", "--clips", "2", "--clip-seconds", "1", "--deadline", "360")
    assert result.returncode == 0, result.stdout + result.stderr
    names = {c["name"] for c in report["checks"]}
    assert {"vllm: asrctl up", "vllm: both instances /ready", "vllm: JFK through nginx answered",
            "vllm: asrctl status", "vllm: asrctl down"} <= names, names
    stack = report["stacks"]["vllm"]
    assert [(i["engine"], i["device"]) for i in stack["instances"]] == [("vllm", "cpu")] * 2
    assert stack["jfk"]["status"] == 200 and stack["model"] == "random-qwen3-asr-tiny"
