"""How much of the machine the benchmark really had: CPU time the whole machine spent busy, from which
a run subtracts its own to tell how many cores other processes kept busy meanwhile."""
from __future__ import annotations

import os


def busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
