"""The machine a benchmark ran on: its CPU's name, and the CPU time the whole machine spent busy, from
which a run subtracts its own to tell how many cores other processes kept busy meanwhile."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    """The CPU's name as /proc/cpuinfo gives it (the line a benchmark states above its table)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
