"""Engines: the one interface (``base``) and the implementations chosen by configuration."""
from __future__ import annotations

import sys
from pathlib import Path

from app.engines.base import DecodeOptions, Engine, Segment, Transcript

__all__ = ["DecodeOptions", "ENGINES", "Engine", "Segment", "Transcript", "engine_bin_dir", "engine_environment", "load_engine"]

ENGINES = ("ctranslate2", "transformers", "qwen3-asr", "vllm")
# What each engine imports beyond the base install: torch and transformers are the `transformers`
# extra, which a ctranslate2-only install (scripts/setup.sh --engine ctranslate2) leaves out.
ENGINE_MODULES = {"ctranslate2": ("faster_whisper",), "transformers": ("torch", "transformers"),
                  "qwen3-asr": ("torch", "transformers"), "vllm": ("vllm",)}
# vLLM pins a transformers older than the qwen3-asr engine's, so it has an environment of its own
# (scripts/setup.sh --engine vllm), beside the checkout's .venv.
ENGINE_ENVIRONMENTS = {"vllm": ".venv-vllm"}


def missing_modules(engine: str) -> list[str]:
    """The modules ``engine`` needs that this environment lacks (checked without importing them)."""
    import importlib.util

    return [m for m in ENGINE_MODULES.get(engine, ()) if importlib.util.find_spec(m) is None]


def engine_environment(engine: str, configured: str = "") -> Path | None:
    """The virtualenv the instances of ``engine`` run from: ``configured`` when set, else this one when
    it has the engine's modules (None: it lacks them), else the engine's own beside the checkout
    (``ENGINE_ENVIRONMENTS``)."""
    if configured:
        return Path(configured).absolute()
    if not missing_modules(engine):
        return Path(sys.prefix)
    name = ENGINE_ENVIRONMENTS.get(engine)
    return Path(__file__).resolve().parents[2] / name if name else None


def engine_bin_dir(engine: str, configured: str = "") -> Path | None:
    """The ``bin`` directory of ``engine_environment`` when that has the engine's modules (looked up
    without importing anything); None when it does not."""
    env = engine_environment(engine, configured)
    if env is None:
        return None
    if env == Path(sys.prefix):
        return None if missing_modules(engine) else Path(sys.executable).parent
    if all(any(env.glob(f"lib/python3*/site-packages/{m}/__init__.py")) for m in ENGINE_MODULES[engine]):
        return env / "bin"
    return None


def load_engine(engine: str, model: str, device: str, compute_type: str = "auto", cpu_threads: int = 0,
                aligner_model: str = "", chunk_seconds: float = 30.0, gpus: int = 1,
                max_sequences: int = 64, gpu_memory_mb: int = 0) -> Engine:
    """Load a model in this process. ``model`` is already resolved to a directory or cached id;
    ``aligner_model`` and ``chunk_seconds`` concern the Qwen3-ASR engines only, ``gpus`` (tensor
    parallel), ``max_sequences`` (requests decoded side by side) and ``gpu_memory_mb`` (what it may take
    of each GPU) the vllm engine only."""
    if engine == "ctranslate2":
        from app.engines.ctranslate2_engine import CTranslate2Engine

        return CTranslate2Engine.load(model, device=device, compute_type=compute_type, cpu_threads=cpu_threads)
    if engine == "transformers":
        from app.engines.transformers_engine import TransformersEngine

        return TransformersEngine.load(model, device=device, compute_type=compute_type, cpu_threads=cpu_threads)
    if engine == "qwen3-asr":
        from app.engines.qwen3_asr_engine import Qwen3AsrEngine

        return Qwen3AsrEngine.load(model, device=device, compute_type=compute_type, cpu_threads=cpu_threads,
                                   aligner_model=aligner_model, chunk_seconds=chunk_seconds)
    if engine == "vllm":
        from app.engines.vllm_engine import VllmEngine

        return VllmEngine.load(model, device=device, compute_type=compute_type, cpu_threads=cpu_threads,
                               aligner_model=aligner_model, chunk_seconds=chunk_seconds, tensor_parallel=gpus,
                               max_sequences=max_sequences, gpu_memory_mb=gpu_memory_mb)
    raise ValueError(f"unknown engine {engine!r}")
