"""Throughput and latency benchmark: the served model (nginx + gunicorn instances, brought up with the
real ``asrctl``) against the bare engine in a process pinned to the same cores.

``python -m bench run`` (``--quick`` for a smoke run); results land in ``bench/results/<timestamp>/``.
"""
import signal
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stop_on_sigterm() -> None:
    """SIGTERM (``timeout``, ``kill``, a CI runner stopping the job) unwinds like Ctrl-C: each command's
    ``finally`` takes its pools down, where dying outright would leave supervisord, nginx and the
    instances running. The exit status is then 143."""
    def terminated(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
