import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import SHARED_AUDIO  # noqa: E402


def pytest_configure(config):
    if not (SHARED_AUDIO / "manifest.jsonl").exists():
        raise pytest.UsageError(f"shared speech clips not found at {SHARED_AUDIO} (set ASR_SHARED_AUDIO)")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One model cache for the whole run, so the embedded model is converted for transformers once."""
    return tmp_path_factory.mktemp("model-cache")
