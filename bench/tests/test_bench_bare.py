"""bench/bare.py's children start with an instance's environment."""
from __future__ import annotations

import multiprocessing as mp
import os
import time

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


def test_two_threads_starting_children_take_turns_with_the_environment(monkeypatch):
    # Without turns, the second thread's variables would replace the first's while its child starts,
    # and the first thread's restore would then take them from under the second's.
    import threading

    monkeypatch.delenv("BENCH_BARE_TURNS", raising=False)
    inside, second_inside, seen = threading.Event(), threading.Event(), {}

    def first():
        with child_environment(BENCH_BARE_TURNS="1"):
            inside.set()
            second_inside.wait(0.5)                  # it may not come in while the first is in
            seen["first"] = os.environ.get("BENCH_BARE_TURNS")

    def second():
        inside.wait(5)
        with child_environment(BENCH_BARE_TURNS="2"):
            second_inside.set()
            seen["second"] = os.environ.get("BENCH_BARE_TURNS")
            time.sleep(0.3)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"first": "1", "second": "2"}
    assert "BENCH_BARE_TURNS" not in os.environ
