"""A service under test, brought up and down with the real ``asrctl`` on free loopback ports."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import requests

from app.control.act.processes import free_ports

BIN = Path(sys.executable).parent


@dataclass
class Service:
    name: str
    run_dir: Path
    instances: int
    cpu_threads: int                       # per instance; 0 = the size of its core set
    flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    instance_ports: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/asr"

    def instance_url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self.instance_ports[i]}/asr"

    def up(self, timeout: float = 300) -> None:
        ports = free_ports(self.instances + 1)
        self.port, self.instance_ports = ports[0], ports[1:]
        args = ["up", "--run-dir", str(self.run_dir), "--instances", str(self.instances), "--host", "127.0.0.1",
                "--port", str(self.port), "--base-port", str(self.instance_ports[0]),
                "--cpu-threads", str(self.cpu_threads), "--quiet", *self.flags]
        asrctl(*args, env=self.env, timeout=timeout)

    def down(self) -> None:
        asrctl("down", "--run-dir", str(self.run_dir), "--quiet", check=False, timeout=120)

    def health(self) -> list[dict]:
        return [requests.get(f"http://127.0.0.1:{p}/health", timeout=5).json() for p in self.instance_ports]

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by supervisord and everything under it: nginx, gunicorn, instances."""
        pid_file = self.run_dir / "supervisord.pid"
        return tree_cpu_seconds(int(pid_file.read_text().strip())) if pid_file.exists() else 0.0


def asrctl(*args: str, env: dict | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "asrctl"), *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise RuntimeError(f"asrctl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result






def tree_cpu_seconds(root: int) -> float:
    """utime + stime of ``root`` and all its descendants, from /proc."""
    parent_of, ticks_of = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        parent_of[pid] = int(fields[1])
        ticks_of[pid] = int(fields[11]) + int(fields[12])
    children = defaultdict(list)
    for pid, parent in parent_of.items():
        children[parent].append(pid)
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += ticks_of.get(pid, 0)
        stack.extend(children[pid])
    return total / os.sysconf("SC_CLK_TCK")
