"""CPU core sets and GPU pins: the small vocabulary the data path (an instance pinning itself) and the
control path (placement, rendering each instance's environment) share, so neither imports the other."""
from __future__ import annotations

import os


def parse_cores(spec: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6] (the taskset / cpuset list format)."""
    cores: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        cores.extend(range(int(lo), int(hi or lo) + 1))
    return cores


def format_cores(cores: tuple[int, ...] | list[int]) -> str:
    return ",".join(str(c) for c in cores)


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def gpu_environment(indices: tuple[int, ...], uuids: tuple[str, ...] = ()) -> dict[str, str]:
    """What pins a process to its GPUs, so that CUDA's device 0 is the first GPU placement chose (and
    device 1 the second, for an instance that spans GPUs).

    By UUID when NVML gave one: unambiguous whatever the numbering. The index is only a fallback, and
    CUDA numbers GPUs fastest first unless told to use the PCI bus order NVML (and nvidia-smi) use;
    on a host with mixed GPUs index 0 would then be a different card in CUDA than in NVML.
    """
    uuids = tuple(uuids) or ("",) * len(indices)
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": ",".join(u or str(i) for i, u in zip(indices, uuids))}


def pinned_gpu(environ: dict[str, str] | None = None) -> str | None:
    """The GPU this process was pinned to (a UUID or a PCI-ordered index), or None when none was."""
    visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    first = visible.split(",")[0].strip()
    return first or None
