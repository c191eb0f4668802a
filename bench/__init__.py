"""Throughput and latency benchmark: the served model (nginx + gunicorn instances, brought up with the
real ``asrctl``) against the bare engine in a process pinned to the same cores.

``python -m bench run`` (``--quick`` for a smoke run); results land in ``bench/results/<timestamp>/``.
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
