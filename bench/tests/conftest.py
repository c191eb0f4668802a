"""The benchmark's own tests: they run bench as a user would, with the project's test helpers."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
