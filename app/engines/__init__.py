"""Engines: the one interface (``base``) and the implementations chosen by configuration."""
from __future__ import annotations

from app.engines.base import DecodeOptions, Engine, Segment, Transcript

__all__ = ["DecodeOptions", "ENGINES", "Engine", "Segment", "Transcript", "load_engine"]

ENGINES = ("ctranslate2", "transformers", "qwen3-asr")
# What each engine imports beyond the base install: torch and transformers are the `transformers`
# extra, which a ctranslate2-only install (scripts/setup.sh --engine ctranslate2) leaves out.
ENGINE_MODULES = {"ctranslate2": ("faster_whisper",), "transformers": ("torch", "transformers"),
                  "qwen3-asr": ("torch", "transformers")}


def missing_modules(engine: str) -> list[str]:
    """The modules ``engine`` needs that this environment lacks (checked without importing them)."""
    import importlib.util

    return [m for m in ENGINE_MODULES.get(engine, ()) if importlib.util.find_spec(m) is None]


def load_engine(engine: str, model: str, device: str, compute_type: str = "auto", cpu_threads: int = 0,
                aligner_model: str = "", chunk_seconds: float = 30.0) -> Engine:
    """Load a model in this process. ``model`` is already resolved to a directory or cached id;
    ``aligner_model`` and ``chunk_seconds`` concern the Qwen3-ASR engine only."""
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
    raise ValueError(f"unknown engine {engine!r}")
