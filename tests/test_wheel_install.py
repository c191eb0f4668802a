"""The service as an operator installs it: a wheel built from a clean export of the tracked files,
installed into a fresh virtualenv, run from a directory that is not a checkout. ``asrctl up`` serves
JFK's sentence through nginx, ``asrctl down`` leaves no process and no port behind."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from support import REPO, SPOKEN, free_ports, normalize, poll, spoken_wav

pytestmark = pytest.mark.integration


def export_tracked(dest: Path) -> Path:
    """The files git tracks, as they are in the working tree: what a clean clone would hold."""
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def run(*cmd, cwd: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=env)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def processes_of(run_dir: Path) -> list[int]:
    """Pids whose environment names this run (asrctl's identity for what it starts)."""
    mark = f"ASRCTL_RUN={run_dir.resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_a_wheel_installed_in_a_fresh_venv_serves_outside_a_checkout(tmp_path):
    export = export_tracked(tmp_path / "export")
    assert not (export / ".git").exists() and not (export / ".venv").exists()
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
        f"{export}/", cwd=tmp_path, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("asr_service-*.whl")
    shutil.rmtree(export)                                   # nothing of the source is left to lean on

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path, timeout=120)
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", wheel, cwd=tmp_path, timeout=900)

    elsewhere = tmp_path / "srv"                            # the operator's directory: no checkout, no app/
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "ASRCTL_RUN")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    where = run(venv / "bin" / "python", "-c", "import app; print(app.__file__)", cwd=elsewhere, timeout=60, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv)  # the installed package, not this checkout

    port, base = free_ports(2)
    run_dir = elsewhere / "run"
    asrctl = venv / "bin" / "asrctl"
    try:
        run(asrctl, "up", "--run-dir", "run", "--instances", "1", "--host", "127.0.0.1", "--port", port,
            "--base-port", base, cwd=elsewhere, timeout=300, env=env)
        answer = requests.post(f"http://127.0.0.1:{port}/asr", files={"audio": ("jfk.wav", spoken_wav())}, timeout=120)
        assert answer.status_code == 200, answer.text
        assert normalize(answer.json()["text"]) == normalize(SPOKEN)
        # Every program it started runs the installed package from the operator's directory.
        pids = processes_of(run_dir)
        assert pids and all(Path(f"/proc/{pid}/cwd").resolve() == elsewhere for pid in pids
                            if Path(f"/proc/{pid}/exe").resolve().name.startswith("python"))
    finally:
        down = subprocess.run([str(asrctl), "down", "--run-dir", "run"], cwd=elsewhere, capture_output=True,
                              text=True, timeout=300, env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert poll(lambda: not processes_of(run_dir), 30), f"left running: {processes_of(run_dir)}"
    assert poll(lambda: not any(listening(p) for p in (port, base)), 10), "something still listens"


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0
