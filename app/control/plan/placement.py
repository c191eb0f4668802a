"""Where each instance runs: a GPU, or a set of CPU cores.

Pure functions of the host's inventory, so they can be tested with any synthetic host; the real
inventory comes from NVML through ``app.hardware.nvml``. ``choose_gpus`` is the one rule for putting instances
on GPUs, used by ``asrctl up`` (``plan_placement``), ``asrctl scale`` (``place_one``) and the
autoscaler's room check (``app.control.plan.policy``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from app.config import ConfigError
from app.hardware.devices import format_cores
from app.hardware.nvml import GpuInfo, driver_absent


class NoRoomError(ConfigError):
    """The GPUs lack the memory (or the headroom, or are too busy) for the instances asked for."""


@dataclass(frozen=True)
class Placement:
    device: str                 # "cpu" | "cuda"
    gpu: int | None = None      # NVML index (PCI bus order), for people and pool.json
    cpu_cores: tuple[int, ...] = ()
    gpu_uuid: str = ""          # what the instance is pinned by, when NVML gave it
    # An instance that spans GPUs (vLLM's tensor parallelism, gpus_per_instance): the others after ``gpu``.
    more_gpus: tuple[int, ...] = ()
    more_gpu_uuids: tuple[str, ...] = ()

    @property
    def threads(self) -> int:
        return max(1, len(self.cpu_cores))

    @property
    def gpus(self) -> tuple[int, ...]:
        """Every GPU the instance holds, ``gpu`` first."""
        return (self.gpu, *self.more_gpus) if self.gpu is not None else ()

    @property
    def gpu_uuids(self) -> tuple[str, ...]:
        return (self.gpu_uuid, *self.more_gpu_uuids) if self.gpu is not None else ()

    def describe(self) -> str:
        if self.device == "cuda":
            return "cuda:" + "+".join(map(str, self.gpus))
        return "cpu:" + format_cores(self.cpu_cores)


@dataclass
class GpuRoom:
    """What ``choose_gpus`` found: the GPUs chosen, and why the others could not take more."""

    chosen: list[int]
    need_mb: int                                          # memory one instance takes, headroom included
    free_mb: dict[int, int] = field(default_factory=dict)   # left on each usable GPU, after the choices
    busy: dict[int, float] = field(default_factory=dict)    # utilization at or over the limit
    faulty: dict[int, str] = field(default_factory=dict)    # no figures from NVML
    util_high_pct: float | None = None
    per_instance: int = 1                                   # GPUs one instance spans

    @property
    def instances(self) -> list[tuple[int, ...]]:
        """``chosen`` as one tuple of GPUs per instance."""
        n = self.per_instance
        return [tuple(self.chosen[i:i + n]) for i in range(0, len(self.chosen), n)]

    def problems(self) -> str:
        """Why no (more) instance fits: '' when nothing stood in the way."""
        full = [i for i in sorted(self.free_mb) if i not in self.busy and self.free_mb[i] < self.need_mb]
        parts = []
        if self.per_instance > 1:
            fit = [i for i in sorted(self.free_mb) if i not in self.busy and i not in full]
            parts.append(f"an instance spans {self.per_instance} GPUs (gpus_per_instance) with {self.need_mb} MB "
                         f"free on each, and {len(fit)} GPU(s) have that"
                         + (f" ({', '.join(f'gpu{i}' for i in fit)})" if fit else ""))
        if full:
            parts.append("GPU memory full (" + ", ".join(f"gpu{i} {self.free_mb[i]} MB free" for i in full)
                         + f"; an instance needs {self.need_mb} MB)")
        if self.busy:
            parts.append("GPU busy (" + ", ".join(f"gpu{i} at {u:.1f}%" for i, u in sorted(self.busy.items()))
                         + f" >= {self.util_high_pct:.1f}%)")
        if self.faulty:
            parts.append("NVML fault (" + ", ".join(f"gpu{i}: {f}" for i, f in sorted(self.faulty.items())) + ")")
        return " and ".join(parts)


def choose_gpus(count: int, gpus: list, instance_mb: int, headroom_mb: int = 0,
                reserved_mb: dict[int, int] | None = None, util_high_pct: float | None = None,
                per_instance: int = 1) -> GpuRoom:
    """Up to ``count`` GPUs for new instances, each on the GPU with the most free memory that still
    has ``instance_mb + headroom_mb`` free (ties: the lowest index). With ``per_instance`` > 1 an
    instance takes that many different GPUs, each charged ``instance_mb`` (its share: tensor
    parallelism splits the weights and the cache evenly), and ``chosen`` holds them instance after
    instance; an instance that does not find them all takes none.

    NVML's free memory already counts every instance that has loaded, so only what it cannot show yet
    is charged on top: ``reserved_mb`` per GPU (instances still starting) and each instance placed
    earlier in this same call. A GPU with an NVML fault (lost, no memory figure) takes nothing; one
    at or above ``util_high_pct`` neither. ``gpus`` holds ``app.hardware.nvml.GpuInfo`` or the policy's
    ``GpuLoad``: anything with ``index``, ``memory_free_mb``, ``utilization_pct``, ``usable``, ``fault``.
    """
    reserved = reserved_mb or {}
    room = GpuRoom([], instance_mb + headroom_mb, util_high_pct=util_high_pct)
    for g in gpus:
        if not g.usable:
            room.faulty[g.index] = g.fault or "no memory figure"
        elif util_high_pct is not None and g.utilization_pct is not None and g.utilization_pct >= util_high_pct:
            room.busy[g.index] = g.utilization_pct
            room.free_mb[g.index] = g.memory_free_mb - reserved.get(g.index, 0)
        else:
            room.free_mb[g.index] = g.memory_free_mb - reserved.get(g.index, 0)
    room.per_instance = per_instance
    for _ in range(count):
        fits = [i for i, free in room.free_mb.items() if i not in room.busy and free >= room.need_mb]
        if len(fits) < per_instance:
            break
        best = sorted(fits, key=lambda i: (-room.free_mb[i], i))[:per_instance]
        for i in best:
            room.free_mb[i] -= instance_mb
        room.chosen.extend(best)
    return room


def resolve_device(device: str, gpus: list[GpuInfo], nvml_error: str = "") -> str:
    """``auto`` is cuda where NVML lists GPUs, cpu where the host has no NVIDIA driver. Where the driver
    is there but NVML fails (a driver upgraded without a reboot, no permission, a hung GPU), the host
    is not taken for a CPU host: serving on the CPU must be asked for, not fallen into."""
    if device == "auto":
        if gpus:
            return "cuda"
        if nvml_error and not driver_absent(nvml_error):
            raise ConfigError(f"device is auto, but NVML (the NVIDIA driver's library) failed: {nvml_error}. "
                              "This host's NVIDIA driver is not working (nvidia-smi shows the same); fix it, "
                              "or set device = \"cpu\" to serve on the CPU")
        return "cpu"
    if device == "cuda" and not gpus:
        raise ConfigError("device is cuda but no NVIDIA GPU is visible "
                          + (f"(NVML: {nvml_error})" if nvml_error else "(NVML found none)"))
    return device


def plan_placement(
    count: int,
    device: str,
    gpus: list[GpuInfo],
    cpu_cores: list[int],
    gpu_map: list[int] | None = None,
    instance_memory_mb: int = 2048,
    cpu_threads: int = 0,
    headroom_mb: int = 0,
    gpus_per_instance: int = 1,
) -> list[Placement]:
    """One placement per instance.

    GPU: the explicit map when given, else ``choose_gpus`` (each instance where memory is most free);
    when they do not all fit, a ConfigError that says what is free and what one needs, rather than
    instances that fail to load. CPU: the cores are split into ``count`` disjoint contiguous sets so
    instances never fight over a core; with more instances than cores, cores are shared round-robin.
    """
    if device == "cuda":
        by_index = {g.index: g for g in gpus}
        if gpu_map is not None:
            if gpus_per_instance > 1:
                raise ConfigError("gpu_map names one GPU per instance; with gpus_per_instance above 1 leave it "
                                  "empty and placement chooses each instance's GPUs")
            missing = sorted(set(gpu_map[:count]) - set(by_index))
            if missing:
                raise ConfigError(f"gpu_map names GPU(s) {missing}, but this host has {sorted(by_index)}")
            return [Placement("cuda", gpu=g, gpu_uuid=by_index[g].uuid) for g in gpu_map[:count]]
        room = choose_gpus(count, gpus, instance_memory_mb, headroom_mb, per_instance=gpus_per_instance)
        if len(room.instances) < count:
            raise NoRoomError(f"room on the GPUs for {len(room.instances)} of {count} instances: {room.problems()}")
        return [gpu_placement(chosen, by_index) for chosen in room.instances]
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


def gpu_placement(chosen: tuple[int, ...], by_index: dict) -> Placement:
    """The placement of an instance on ``chosen`` GPUs (indices), pinned by their UUIDs."""
    first, *more = chosen
    return Placement("cuda", gpu=first, gpu_uuid=by_index[first].uuid, more_gpus=tuple(more),
                     more_gpu_uuids=tuple(by_index[i].uuid for i in more))


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
              threads: int, gpu: int | tuple[int, ...] | None = None, instance_memory_mb: int = 2048,
              starting: list[Placement] = (), headroom_mb: int = 0, gpus_per_instance: int = 1) -> Placement:
    """Where one more instance goes, next to those already placed.

    GPU: the one asked for, else ``choose_gpus``: NVML's free memory already holds the running
    instances, so only the ``starting`` ones (not loaded yet) are charged. CPU: the ``threads``
    least-used cores (idle ones first), so a pool grows onto free cores and only shares a core when
    the operator asks for more instances than there are free core sets.
    """
    if device == "cuda":
        by_index = {g.index: g for g in gpus}
        if isinstance(gpu, tuple):   # the autoscaler's choice for an instance that spans GPUs
            return gpu_placement(gpu, by_index)
        if gpu is not None:
            return Placement("cuda", gpu=gpu, gpu_uuid=by_index[gpu].uuid if gpu in by_index else "")
        reserved: dict[int, int] = {}
        for p in starting:
            for g in p.gpus:
                reserved[g] = reserved.get(g, 0) + instance_memory_mb
        room = choose_gpus(1, gpus, instance_memory_mb, headroom_mb, reserved, per_instance=gpus_per_instance)
        if not room.instances:
            raise NoRoomError(f"no room on a GPU for another instance: {room.problems() or 'no GPU'}")
        return gpu_placement(room.instances[0], by_index)
    usage = core_usage(existing, cores)
    chosen = sorted(cores, key=lambda c: (usage[c], c))[:max(1, threads)]
    return Placement("cpu", cpu_cores=tuple(sorted(chosen)))


def capacity_weights(placements: list[Placement], gpus: list[GpuInfo]) -> list[int]:
    """nginx weights in 1..10 that follow each instance's capacity.

    A GPU instance weighs by its card's memory (a proxy for its class: an 80 GB card next to a 24 GB
    one gets about three times the traffic), a CPU instance by the cores it is pinned to.
    """
    memory = {g.index: g.memory_total_mb or 1 for g in gpus}
    raw = [float(memory.get(p.gpu, 1)) if p.device == "cuda" else float(p.threads) for p in placements]
    if len(set(raw)) <= 1:
        return [1] * len(raw)
    top = max(raw)
    return [max(1, min(10, round(10 * r / top))) for r in raw]
