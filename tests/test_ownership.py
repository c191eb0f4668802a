"""asrctl touches only what is its own: ownership by identity (the run's exact directory in the
process's environment, nginx's identity file, descent), never by name, prefix or port.

Real processes throughout: a foreign ``python3 -m http.server`` on an instance port, two runs whose
directories share a prefix, short-lived processes that carry (or lose) a run's identity.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from app.control.act import processes
from app.control.paths import RunPaths
from support import BIN, free_ports, poll, run_asrctl


def _carrying(root: str | Path, *argv: str) -> subprocess.Popen:
    """A process of this test whose environment names ``root`` as its run (as supervisord's programs do)."""
    return subprocess.Popen(list(argv), env={**os.environ, processes.IDENTITY_ENV: str(root)})


def _found(paths: RunPaths, pid: int) -> processes.Proc | None:
    return next((p for p in processes.run_processes(paths) if p.pid == pid), None)


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


# -- identity, exact; signals, only to the same process ------------------------------------------

def test_identity_is_the_exact_run_directory_not_a_prefix(tmp_path):
    root = RunPaths.at(tmp_path / "asr")
    exact = _carrying(root.root, "sleep", "30")
    prefix = _carrying(f"{root.root}-b", "sleep", "30")
    parent = _carrying(root.root.parent, "sleep", "30")
    try:
        assert poll(lambda: _found(root, exact.pid), 5)
        pids = {p.pid for p in processes.run_processes(root)}
        assert exact.pid in pids
        assert prefix.pid not in pids and parent.pid not in pids
        assert {p.pid for p in processes.run_processes(RunPaths.at(f"{root.root}-b"))} == {prefix.pid}
    finally:
        _stop(exact, prefix, parent)


def test_a_process_is_ours_by_descent_and_each_signal_reaches_only_the_process_found(tmp_path):
    paths = RunPaths.at(tmp_path / "asr")
    # The child clears its environment: it is still the run's, as a child of a process that carries it.
    parent = _carrying(paths.root, "sh", "-c", "env -i sleep 30 & wait")
    try:
        family = poll(lambda: (found := processes.run_processes(paths)) and len(found) == 2 and found, 5)
        assert family, processes.run_processes(paths)
        child = next(p for p in family if p.pid != parent.pid)
        assert processes._environ(child.pid).get(processes.IDENTITY_ENV) is None
        assert child.ppid == parent.pid and child.run == str(paths.root)

        # The same pid with another start time is another process (a pid reused since the scan).
        assert not processes.send(dataclasses.replace(child, started=child.started + 1), signal.SIGTERM)
        # Found without a run's identity: nothing proves it is ours.
        assert not processes.send(dataclasses.replace(child, run=""), signal.SIGTERM)
        time.sleep(0.3)
        assert processes.alive([child]) == [child]

        assert processes.send(child, signal.SIGTERM)
        assert processes.alive([child], 5) == []
    finally:
        _stop(parent)


def test_a_process_that_no_longer_carries_the_identity_is_not_signalled(tmp_path):
    """Same pid, same start time, but it exec'd itself out of the run (its environment is new): the
    identity is read again through the pidfd check, so it is left alone."""
    paths = RunPaths.at(tmp_path / "asr")
    proc = _carrying(paths.root, "sh", "-c", f"sleep 0.5; exec env -u {processes.IDENTITY_ENV} sleep 30")
    try:
        found = poll(lambda: _found(paths, proc.pid), 5)
        assert found and found.kind == "other"
        assert poll(lambda: processes._cmdline(proc.pid)[:1] == ["sleep"] and
                     processes._cmdline(proc.pid)[1:] == ["30"], 5)
        assert processes.start_time(proc.pid) == found.started
        assert not processes.send(found, signal.SIGTERM)
        time.sleep(0.3)
        assert proc.poll() is None
    finally:
        _stop(proc)


def test_a_gone_process_is_not_signalled(tmp_path):
    paths = RunPaths.at(tmp_path / "asr")
    proc = _carrying(paths.root, "sleep", "30")
    found = poll(lambda: _found(paths, proc.pid), 5)
    _stop(proc)
    assert found and not processes.send(found, signal.SIGTERM)


def test_a_port_held_by_another_process_is_refused_naming_it(tmp_path):
    paths = RunPaths.at(tmp_path / "asr")
    (port,) = free_ports(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        with pytest.raises(processes.PortHeld) as refused:
            processes.refuse_foreign(paths, {port}, "asrctl up")
        message = str(refused.value)
        assert f"port {port} is held by pid {os.getpid()} (" in message and "pytest" in message
        assert "\n" not in message
    # The same port held by a process of the run is not refused.
    holder = _carrying(paths.root, sys.executable, "-c",
                       f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); "
                       "s.listen(); time.sleep(30)")
    try:
        assert poll(lambda: processes.listeners({port}).get(port) == {holder.pid}, 10)
        processes.refuse_foreign(paths, {port}, "asrctl up")
        assert processes.foreign_holders(paths, {port}) == {}
    finally:
        _stop(holder)


@pytest.mark.parametrize("buffered", [True, False])
def test_status_into_a_closed_pipe_exits_quietly(tmp_path, buffered):
    """`asrctl status | head`: the reader goes away; no traceback, no misleading error line, whether
    the write fails in a print (unbuffered) or in the last flush."""
    read, write = os.pipe()
    os.close(read)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    result = subprocess.run([str(BIN / "asrctl"), "status", "--run-dir", str(tmp_path / "none")],
                            stdout=write, stderr=subprocess.PIPE, text=True, timeout=60, env=env)
    os.close(write)
    assert result.stderr == ""
    assert result.returncode == 141


def test_up_refuses_a_public_port_another_process_holds_and_starts_nothing(tmp_path):
    public, base = free_ports(2)
    foreign = subprocess.Popen([sys.executable, "-m", "http.server", str(public), "--bind", "127.0.0.1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    paths = RunPaths.at(tmp_path / "asr")
    try:
        assert poll(lambda: processes.listeners({public}).get(public) == {foreign.pid}, 20)
        up = _up(paths.root, 1, public, base, check=False)
        assert up.returncode == 1 and up.stdout == "", up.stdout
        assert up.stderr.startswith(f"asrctl up: port {public} is held by pid {foreign.pid} (")
        assert "http.server" in up.stderr and len(up.stderr.strip().splitlines()) == 1
        assert processes.run_processes(paths) == [] and not paths.socket.exists()
        assert foreign.poll() is None
    finally:
        _down_and_clean(paths.root)
        _stop(foreign)


# -- with real services --------------------------------------------------------------------------

def _up(run_dir: Path, instances: int, port: int, base_port: int, check: bool = True):
    return run_asrctl("up", "--run-dir", str(run_dir), "--instances", str(instances), "--host", "127.0.0.1",
                      "--port", str(port), "--base-port", str(base_port), "--cpu-threads", "1",
                      check=check, timeout=400)


def _down_and_clean(run_dir: Path) -> None:
    """`asrctl down`; then never leave a process of the run behind, even when a test failed."""
    run_asrctl("down", "--run-dir", str(run_dir), check=False, timeout=400)
    paths = RunPaths.at(run_dir)
    left = processes.run_processes(paths)
    if left:
        processes.retire(left, 5, log=lambda m: None)
    assert left == [], left


@pytest.mark.integration
def test_a_foreign_listener_on_an_instance_port_survives_up_scale_and_down(tmp_path):
    public, base, taken = free_ports(3)
    foreign = subprocess.Popen([sys.executable, "-m", "http.server", str(taken), "--bind", "127.0.0.1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    run_dir = tmp_path / "asr"
    paths = RunPaths.at(run_dir)
    try:
        assert poll(lambda: processes.listeners({taken}).get(taken) == {foreign.pid}, 20)
        started = processes.start_time(foreign.pid)

        up = _up(run_dir, 2, public, base, check=False)
        assert up.returncode == 1, up.stdout + up.stderr
        refusal = up.stderr.strip()
        assert len(refusal.splitlines()) == 1, refusal
        assert f"port {taken} is held by pid {foreign.pid} (" in refusal and "http.server" in refusal, refusal
        assert "retiring" not in up.stdout
        assert processes.run_processes(paths) == [] and not paths.socket.exists()

        _up(run_dir, 1, public, base)  # the port it does not need is not its business
        scale = run_asrctl("scale", "2", "--run-dir", str(run_dir), check=False, timeout=400)
        assert scale.returncode == 1 and f"pid {foreign.pid} (" in scale.stderr, scale.stdout + scale.stderr
        status = run_asrctl("status", "--json", "--run-dir", str(run_dir), check=False)
        assert [r["name"] for r in json.loads(status.stdout)["instances"] if r["port"]] == [f"asr-{base}"]

        down = run_asrctl("down", "--run-dir", str(run_dir), timeout=400)
        assert "retir" not in down.stdout and "orphan" not in down.stdout, down.stdout
        assert processes.run_processes(paths) == []

        assert foreign.poll() is None and processes.start_time(foreign.pid) == started
        assert requests.get(f"http://127.0.0.1:{taken}/", timeout=5).status_code == 200
    finally:
        _down_and_clean(run_dir)
        _stop(foreign)


@pytest.mark.integration
def test_a_run_in_a_prefix_directory_keeps_every_pid_through_the_other_s_up_and_down(tmp_path):
    """/srv/asr and /srv/asr-b: the first run's up and down leave every process of the second alone."""
    ports = free_ports(4)
    a_ports, b_ports = ports[:2], ports[2:]
    b_dir, a_dir = tmp_path / "asr-b", tmp_path / "asr"
    try:
        _up(b_dir, 1, *b_ports)
        b = processes.run_processes(RunPaths.at(b_dir))
        kinds = sorted(p.kind for p in b)
        # supervisord, the instance (gunicorn master and worker), nginx (master and workers), the
        # liveness watcher and the job runner
        assert {"supervisord", "instance", "nginx", "control"} <= set(kinds), b
        assert any("asrctl watch" in p.program for p in b), b

        _up(a_dir, 1, *a_ports)
        a = processes.run_processes(RunPaths.at(a_dir))
        assert a and {p.pid for p in a}.isdisjoint(p.pid for p in b)
        assert processes.alive(b) == b
        down = run_asrctl("down", "--run-dir", str(a_dir), timeout=400)
        assert "retir" not in down.stdout and "orphan" not in down.stdout, down.stdout
        assert processes.run_processes(RunPaths.at(a_dir)) == []

        time.sleep(1)
        assert processes.alive(b) == b, [p for p in b if p not in processes.alive(b)]
        assert requests.get(f"http://127.0.0.1:{b_ports[0]}/ready", timeout=5).status_code == 200
        watcher_log = (b_dir / "logs" / "watcher.log").read_text()
        assert watcher_log.count("watching every") == 1, watcher_log[-2000:]
    finally:
        _down_and_clean(a_dir)
        _down_and_clean(b_dir)


def test_a_worker_nginx_forks_during_the_scan_is_not_taken_for_an_orphan(tmp_path, monkeypatch):
    """A reload makes the supervised master fork workers at any moment; one forked after a process
    tree was taken but before the scan read it must still count as the master's (it was QUIT as an
    'orphan' when the tree came first). Orphans are what the scan shows with another parent."""
    from app.config import Settings
    from app.control.act import heal

    master, fresh_worker, orphan = 1000, 1001, 1002
    scan = [processes.Proc(master, 1, "nginx", (7860,), 1, "nginx: master", str(tmp_path)),
            processes.Proc(fresh_worker, master, "nginx", (7860,), 2, "nginx: worker", str(tmp_path)),
            processes.Proc(orphan, 1, "nginx", (7860,), 3, "nginx: worker", str(tmp_path))]
    monkeypatch.setattr(processes, "run_processes", lambda paths, ports=frozenset(): scan)
    monkeypatch.setattr(processes, "tree", lambda pid: {master})   # taken before the fork
    found = heal.nginx_orphans(Settings(port=7860), RunPaths.at(tmp_path), master)
    assert [p.pid for p in found] == [orphan]


def test_a_process_supervisord_starts_during_the_scan_is_not_taken_for_an_orphan(tmp_path, monkeypatch):
    """supervisord may start a program while the scan runs; its tree, read after the scan, holds it."""
    supervisord, started = 2000, 2001
    events = []

    def scan(paths, ports=frozenset()):
        events.append("scan")   # supervisord has started the program by the time the scan reads it
        return [processes.Proc(started, supervisord, "instance", (), 5, "gunicorn", str(tmp_path))]

    def tree(pid):
        return {supervisord, started} if "scan" in events else {supervisord}

    monkeypatch.setattr(processes, "run_processes", scan)
    monkeypatch.setattr(processes, "tree", tree)
    assert processes.orphans(RunPaths.at(tmp_path), set(), supervisord) == []
