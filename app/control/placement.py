"""Where each instance runs: a GPU, or a set of CPU cores.

``plan_placement`` is a pure function of the host's inventory so it can be tested with any
synthetic host; ``detect_gpus`` reads the real inventory from NVML when there is one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from app.config import ConfigError


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total_mb: int
    memory_free_mb: int
    utilization_pct: int = 0


@dataclass(frozen=True)
class Placement:
    device: str                 # "cpu" | "cuda"
    gpu: int | None = None      # physical GPU index, exposed as CUDA_VISIBLE_DEVICES
    cpu_cores: tuple[int, ...] = ()

    @property
    def threads(self) -> int:
        return max(1, len(self.cpu_cores))

    def describe(self) -> str:
        if self.device == "cuda":
            return f"cuda:{self.gpu}"
        return "cpu:" + format_cores(self.cpu_cores)


def detect_gpus() -> list[GpuInfo]:
    """The host's GPUs from NVML; empty on a host without an NVIDIA driver."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            gpus.append(GpuInfo(i, name if isinstance(name, str) else name.decode(),
                                mem.total // 2**20, mem.free // 2**20, util))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def resolve_device(device: str, gpus: list[GpuInfo]) -> str:
    if device == "auto":
        return "cuda" if gpus else "cpu"
    if device == "cuda" and not gpus:
        raise ConfigError("device is cuda but no NVIDIA GPU is visible (NVML found none)")
    return device


def plan_placement(
    count: int,
    device: str,
    gpus: list[GpuInfo],
    cpu_cores: list[int],
    gpu_map: list[int] | None = None,
    instance_memory_mb: int = 2048,
    cpu_threads: int = 0,
) -> list[Placement]:
    """One placement per instance.

    GPU: the explicit map when given, else each instance goes to the GPU with the most free memory,
    counting the instances already placed there at ``instance_memory_mb`` each.
    CPU: the cores are split into ``count`` disjoint contiguous sets so instances never fight over a
    core; with more instances than cores, cores are shared round-robin.
    """
    if device == "cuda":
        known = {g.index for g in gpus}
        if gpu_map is not None:
            missing = sorted(set(gpu_map[:count]) - known)
            if missing:
                raise ConfigError(f"gpu_map names GPU(s) {missing}, but this host has {sorted(known)}")
            return [Placement("cuda", gpu=g) for g in gpu_map[:count]]
        free = {g.index: g.memory_free_mb for g in gpus}
        placements = []
        for _ in range(count):
            best = max(free, key=lambda i: (free[i], -i))
            free[best] -= instance_memory_mb
            placements.append(Placement("cuda", gpu=best))
        return placements
    if not cpu_cores:
        raise ConfigError("no CPU cores available to place instances on")
    if count >= len(cpu_cores):
        sets = [(cpu_cores[i % len(cpu_cores)],) for i in range(count)]
    else:
        share, extra = divmod(len(cpu_cores), count)
        sets, start = [], 0
        for i in range(count):
            size = share + (1 if i < extra else 0)
            sets.append(tuple(cpu_cores[start:start + size]))
            start += size
    if cpu_threads > 0:  # an explicit thread count caps each set
        sets = [s[:cpu_threads] for s in sets]
    return [Placement("cpu", cpu_cores=s) for s in sets]


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def format_cores(cores: tuple[int, ...] | list[int]) -> str:
    return ",".join(str(c) for c in cores)


def parse_cores(spec: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6] (the taskset / cpuset list format)."""
    cores: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        cores.extend(range(int(lo), int(hi or lo) + 1))
    return cores


def core_usage(existing: list[Placement], cores: list[int]) -> dict[int, int]:
    usage = {c: 0 for c in cores}
    for p in existing:
        for c in p.cpu_cores:
            if c in usage:
                usage[c] += 1
    return usage


def free_core_sets(existing: list[Placement], cores: list[int], threads: int) -> int:
    """How many more instances of ``threads`` cores fit on cores no instance uses yet."""
    idle = sum(1 for n in core_usage(existing, cores).values() if n == 0)
    return idle // max(1, threads)


def place_one(existing: list[Placement], device: str, gpus: list[GpuInfo], cores: list[int],
              threads: int, gpu: int | None = None, instance_memory_mb: int = 2048) -> Placement:
    """Where one more instance goes, next to those already placed.

    GPU: the one asked for, else the most free memory counting instances placed here. CPU: the
    ``threads`` least-used cores (idle ones first), so a pool grows onto free cores and only shares a
    core when the operator asks for more instances than there are free core sets.
    """
    if device == "cuda":
        if gpu is not None:
            return Placement("cuda", gpu=gpu)
        free = {g.index: g.memory_free_mb for g in gpus}
        for p in existing:
            if p.gpu in free:
                free[p.gpu] -= instance_memory_mb
        if not free:
            raise ConfigError("no GPU to place an instance on")
        return Placement("cuda", gpu=max(free, key=lambda i: (free[i], -i)))
    usage = core_usage(existing, cores)
    chosen = sorted(cores, key=lambda c: (usage[c], c))[:max(1, threads)]
    return Placement("cpu", cpu_cores=tuple(sorted(chosen)))


def capacity_weights(placements: list[Placement], gpus: list[GpuInfo]) -> list[int]:
    """nginx weights in 1..10 that follow each instance's capacity.

    A GPU instance weighs by its card's memory (a proxy for its class: an 80 GB card next to a 24 GB
    one gets about three times the traffic), a CPU instance by the cores it is pinned to.
    """
    memory = {g.index: g.memory_total_mb for g in gpus}
    raw = [float(memory.get(p.gpu, 1)) if p.device == "cuda" else float(p.threads) for p in placements]
    if len(set(raw)) <= 1:
        return [1] * len(raw)
    top = max(raw)
    return [max(1, min(10, round(10 * r / top))) for r in raw]
