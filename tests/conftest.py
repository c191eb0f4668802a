import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import SPEECH  # noqa: E402


def pytest_configure(config):
    if not (SPEECH / "manifest.jsonl").exists():
        raise pytest.UsageError(f"speech clips not found at {SPEECH} (set ASR_SPEECH)")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One model cache for the whole run, so the embedded model is converted for transformers once."""
    return tmp_path_factory.mktemp("model-cache")
