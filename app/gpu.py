"""NVML, the NVIDIA driver's management library: the one module that calls ``pynvml``.

Placement, the autoscaler and ``asrctl status`` (control path) and each GPU instance's ``/metrics`` and
``/health`` (data path) read GPUs through here, so every NVML call is guarded in one place. A fault
never raises: NVML missing (no driver), a GPU that fell off the bus (``GpuIsLost``) or a figure the
GPU does not report (``NotSupported`` on MIG or vGPU) degrades to "no figure", with a ``fault`` that
says why, and one log line per distinct fault (not one per scrape or tick).

NVML is initialised once per process and left initialised: handles stay valid, and a scrape or a
tick does not pay for ``nvmlInit`` (which can take seconds on a host without persistence mode).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import pynvml

log = logging.getLogger("asr.gpu")

_MB = 2**20


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it. A figure NVML could not give is None; ``fault`` says why."""

    index: int                          # NVML's index: PCI bus order, as nvidia-smi numbers GPUs
    name: str
    memory_total_mb: int | None = None
    memory_free_mb: int | None = None
    utilization_pct: float | None = None  # None: not reported (MIG, vGPU) or unreadable
    uuid: str = ""
    pci_bus_id: str = ""
    fault: str = ""                     # e.g. "GPU is lost"; empty when every figure was read

    @property
    def usable(self) -> bool:
        """Can take an instance: no fault and a free-memory figure to place by."""
        return not self.fault and self.memory_free_mb is not None

    @property
    def memory_used_mb(self) -> int | None:
        if self.memory_total_mb is None or self.memory_free_mb is None:
            return None
        return self.memory_total_mb - self.memory_free_mb

    def as_dict(self) -> dict:
        return {"index": self.index, "uuid": self.uuid or None, "name": self.name,
                "pci_bus_id": self.pci_bus_id or None, "memory_total_mb": self.memory_total_mb,
                "memory_used_mb": self.memory_used_mb, "memory_free_mb": self.memory_free_mb,
                "utilization_pct": self.utilization_pct, "fault": self.fault or None}


@dataclass(frozen=True)
class Inventory:
    gpus: list[GpuInfo]
    error: str = ""      # NVML itself is unusable (no driver, no library): no GPU figures at all


_lock = threading.Lock()
_initialised = False
_reported: set[str] = set()    # faults logged and still present


def reset() -> None:
    """Forget the NVML session and the faults already logged (tests swap the library's functions)."""
    global _initialised
    with _lock:
        _initialised = False
        _reported.clear()


def inventory() -> Inventory:
    """Every GPU NVML sees, each with what could be read of it."""
    error = _ensure_initialised()
    if error:
        return Inventory([], error)
    count, fault = _call("nvmlDeviceGetCount")
    if fault:
        _report({"count": fault})
        return Inventory([], fault)
    gpus = [_read(i, *_call("nvmlDeviceGetHandleByIndex", i)) for i in range(count)]
    _report({f"gpu{g.index}": g.fault for g in gpus if g.fault})
    return Inventory(gpus)


def detect_gpus() -> list[GpuInfo]:
    """The host's GPUs; empty on a host without an NVIDIA driver (or when NVML fails)."""
    return inventory().gpus


def gpu(ident: str) -> GpuInfo | None:
    """One GPU by UUID (``GPU-...``) or NVML index; None when NVML is unusable or knows no such GPU."""
    if _ensure_initialised():
        return None
    handle, fault = _handle(ident)
    if handle is None:
        _report({f"gpu {ident}": fault})
        return GpuInfo(int(ident) if ident.isdigit() else -1, "", uuid="" if ident.isdigit() else ident,
                       fault=fault)
    index, _ = _call("nvmlDeviceGetIndex", handle)
    info = _read(index if isinstance(index, int) else -1, handle, "")
    _report({f"gpu {ident}": info.fault} if info.fault else {})
    return info


def process_memory_mb(ident: str, pid: int) -> int | None:
    """GPU memory process ``pid`` holds on this GPU, as NVML accounts it; None when NVML cannot tell
    (no such process on it, or a container whose process ids NVML does not see)."""
    if _ensure_initialised():
        return None
    handle, _ = _handle(ident)
    if handle is None:
        return None
    processes, fault = _call("nvmlDeviceGetComputeRunningProcesses", handle)
    if fault:
        return None
    for p in processes or ():
        used = getattr(p, "usedGpuMemory", None)
        if p.pid == pid and isinstance(used, int):
            return used // _MB
    return None


# -- internals --------------------------------------------------------------------------------------


def _ensure_initialised() -> str:
    """'' once NVML is up in this process; else why not (tried again on the next call)."""
    global _initialised
    with _lock:
        if _initialised:
            return ""
        _, fault = _call("nvmlInit")
        if fault:
            _report({"init": f"NVML unavailable, no GPU figures ({fault})"}, level=logging.INFO)
            return fault
        _initialised = True
        return ""


def _call(function: str, *args):
    """(result, '') or (None, what failed): the one guard around every NVML function."""
    try:
        return getattr(pynvml, function)(*args), ""
    except pynvml.NVMLError as e:
        return None, _describe(e)
    except Exception as e:  # noqa: BLE001 - a broken driver can fail in ctypes too: still no traceback
        return None, f"{type(e).__name__}: {e}"


def _describe(error: Exception) -> str:
    return str(error) or type(error).__name__


def _handle(ident: str):
    if ident.startswith(("GPU-", "MIG-")):
        return _call("nvmlDeviceGetHandleByUUID", ident)
    try:
        index = int(ident)
    except ValueError:
        return None, f"not a GPU UUID or index: {ident!r}"
    return _call("nvmlDeviceGetHandleByIndex", index)


def _read(index: int, handle, fault: str) -> GpuInfo:
    """Every figure of one GPU, each read on its own so one unsupported figure loses only itself."""
    if handle is None:
        return GpuInfo(index, "", fault=fault)
    name, _ = _call("nvmlDeviceGetName", handle)
    uuid, _ = _call("nvmlDeviceGetUUID", handle)
    pci, _ = _call("nvmlDeviceGetPciInfo", handle)
    memory, memory_fault = _call("nvmlDeviceGetMemoryInfo", handle)
    rates, util_fault = _call("nvmlDeviceGetUtilizationRates", handle)
    faults = [f"memory: {memory_fault}"] if memory_fault else []
    if util_fault and util_fault not in (memory_fault, _describe(pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED))):
        faults.append(f"utilization: {util_fault}")   # Not Supported (MIG, vGPU) is no fault
    return GpuInfo(
        index=index,
        name=_text(name),
        memory_total_mb=memory.total // _MB if memory is not None else None,
        memory_free_mb=memory.free // _MB if memory is not None else None,
        utilization_pct=float(rates.gpu) if rates is not None else None,
        uuid=_text(uuid),
        pci_bus_id=_text(getattr(pci, "busId", "")),
        fault="; ".join(faults),
    )


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else ""


def _report(faults: dict[str, str], level: int = logging.WARNING) -> None:
    """Log each distinct fault once per process: a lost GPU must not write a line per scrape or tick."""
    for key, message in faults.items():
        line = f"{key}: {message}"
        if line not in _reported:
            _reported.add(line)
            log.log(level, "NVML %s", line)
