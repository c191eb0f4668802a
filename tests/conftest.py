import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One model cache for the whole run, so the embedded model is converted for transformers once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def qwen_models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Qwen3-ASR (taught to name the language of three clips and stop) and a tiny random forced
    aligner, both in the -hf layout, built once per run: (model directory, aligner directory)."""
    import random_qwen3_asr

    return random_qwen3_asr.build(tmp_path_factory.mktemp("qwen3-asr"), random_qwen3_asr.taught_examples())


@pytest.fixture(scope="session")
def qwen_models_vllm(tmp_path_factory) -> tuple[Path, Path]:
    """The same taught tiny Qwen3-ASR with attention heads of 32 (vLLM's CPU attention runs 32, 64,
    80, ... 256, not 16) and its aligner: (model directory, aligner directory)."""
    import random_qwen3_asr

    return random_qwen3_asr.build(tmp_path_factory.mktemp("qwen3-asr-hd32"), random_qwen3_asr.taught_examples(),
                                  head_dim=32)
