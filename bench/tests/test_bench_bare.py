"""bench/bare.py's children start with an instance's environment."""
from __future__ import annotations

import multiprocessing as mp
import os

from bench.bare import child_environment

AT_IMPORT = os.environ.get("OMP_NUM_THREADS")   # what a spawned child's imports (numpy's OpenBLAS) see


def _report(conn) -> None:
    conn.send(AT_IMPORT)


def test_a_spawned_child_has_the_variables_before_its_imports_and_the_parent_gets_its_own_back(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    ctx = mp.get_context("spawn")
    seen = []
    for variables in ({"OMP_NUM_THREADS": "1"}, {}):
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_report, args=(child,))
        with child_environment(**variables, OMP_WAIT_POLICY="PASSIVE"):
            process.start()
        seen.append(parent.recv())
        process.join(30)
    assert seen == ["1", None]
    assert "OMP_NUM_THREADS" not in os.environ and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
