"""NVML, the NVIDIA driver's management library: the one module that calls ``pynvml``.

Placement, the autoscaler and ``asrctl status`` (control path) and each GPU instance's ``/metrics`` and
``/health`` (data path) read GPUs through here, so every NVML call is guarded in one place. A fault
never raises: NVML missing (no driver), a GPU that fell off the bus (``GpuIsLost``) or a figure the
GPU does not report (``NotSupported`` on MIG or vGPU) degrades to "no figure", with a ``fault`` that
says why, and one log line per distinct fault (not one per scrape or tick), and one when it clears.

Every call is also bounded in time: a GPU falling off the bus can make NVML block, as it makes
``nvidia-smi`` hang, and a scrape, an autoscaler tick or ``asrctl status`` must not hang with it.
Calls run on one NVML thread; one that does not answer within ``CALL_TIMEOUT_S`` is a fault, and
until it returns every later call fails at once with "NVML not answering".

NVML is initialised once per process and left initialised: handles stay valid, and a scrape or a
tick does not pay for ``nvmlInit`` (which can take seconds on a host without persistence mode).
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass

import pynvml

log = logging.getLogger("asr.gpu")

_MB = 2**20
CALL_TIMEOUT_S = 10.0     # one NVML query
INIT_TIMEOUT_S = 30.0     # nvmlInit: loads the driver's state for every GPU without persistence mode


def _describe(error: Exception) -> str:
    return str(error) or type(error).__name__


# What NVML answers on a host with no NVIDIA driver at all, as opposed to a driver that is there but
# broken (a library/driver version mismatch after an upgrade without a reboot, no permission, ...).
_NO_DRIVER = {_describe(pynvml.NVMLError(code))
              for code in (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED)}
_NOT_SUPPORTED = _describe(pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED))
_NOT_FOUND = _describe(pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND))


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it. A figure NVML could not give is None; ``fault`` says why the GPU
    cannot take an instance (lost, no memory figure, MIG mode), ``utilization_fault`` why
    utilization alone is missing (which does not stop placement)."""

    index: int                          # NVML's index: PCI bus order, as nvidia-smi numbers GPUs
    name: str
    memory_total_mb: int | None = None
    memory_free_mb: int | None = None
    utilization_pct: float | None = None  # None: not reported (MIG, vGPU) or unreadable
    uuid: str = ""
    pci_bus_id: str = ""
    fault: str = ""                     # e.g. "GPU is lost"; empty when the GPU can be placed on
    utilization_fault: str = ""

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
                "utilization_pct": self.utilization_pct, "fault": self.fault or None,
                "utilization_fault": self.utilization_fault or None}


@dataclass(frozen=True)
class Inventory:
    gpus: list[GpuInfo]
    error: str = ""      # NVML itself is unusable (no driver, no library, a broken driver): no GPU figures

    @property
    def no_driver(self) -> bool:
        return driver_absent(self.error)


def driver_absent(error: str) -> bool:
    """NVML failed because this host has no NVIDIA driver: a CPU host, not a GPU host whose driver is
    broken (which must not be taken for a CPU host and quietly served on the CPU)."""
    return error in _NO_DRIVER


_lock = threading.Lock()
_report_lock = threading.Lock()
_initialised = False
_reported: dict[str, str] = {}    # faults logged and still present: key -> message


def reset() -> None:
    """Forget the NVML session and the faults already logged (tests swap the library's functions;
    a forked child must not use its parent's handles or NVML thread)."""
    global _initialised
    with _lock:
        _initialised = False
        _reported.clear()
    _caller.forget()


def inventory() -> Inventory:
    """Every GPU NVML sees, each with what could be read of it."""
    error = _ensure_initialised()
    if error:
        return Inventory([], error)
    count, fault = _call("nvmlDeviceGetCount")
    if fault:
        _report({"count": fault}, clear=["count"])
        return Inventory([], fault)
    gpus = [_read(i, *_call("nvmlDeviceGetHandleByIndex", i), placed=True) for i in range(count)]
    faults = {f"gpu{g.index}": g.fault for g in gpus if g.fault}
    faults |= {f"gpu{g.index} utilization": g.utilization_fault for g in gpus if g.utilization_fault}
    _report(faults, clear=["count", *(f"gpu{g.index}" for g in gpus), *(f"gpu{g.index} utilization" for g in gpus)])
    return Inventory(gpus)


def detect_gpus() -> list[GpuInfo]:
    """The host's GPUs; empty on a host without an NVIDIA driver (or when NVML fails)."""
    return inventory().gpus


def gpu(ident: str) -> GpuInfo | None:
    """One GPU by UUID (``GPU-...``, ``MIG-...``) or NVML index; None when NVML is unusable.

    A MIG slice is accepted under either prefix: CUDA names every device by 16 bytes and this
    project writes them ``GPU-...``, where NVML calls a MIG slice ``MIG-...``.
    """
    if _ensure_initialised():
        return None
    handle, fault = _handle(ident)
    key = f"gpu {ident}"
    if handle is None:
        _report({key: fault}, clear=[key])
        return GpuInfo(int(ident) if ident.isdigit() else -1, "", uuid="" if ident.isdigit() else ident,
                       fault=fault)
    index, _ = _call("nvmlDeviceGetIndex", handle)
    info = _read(index if isinstance(index, int) else -1, handle, "", placed=False)
    _report({key: info.fault} if info.fault else {}, clear=[key])
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


class _Caller:
    """One daemon thread that makes the NVML calls, so that a caller can stop waiting for one.

    A daemon thread, not a ThreadPoolExecutor: the interpreter joins an executor's threads at exit,
    and a call stuck in the driver would then hang ``asrctl`` on its way out.
    """

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._guard = threading.Lock()
        self.stuck: tuple[str, float] | None = None    # (function, since) while a call has not returned

    def forget(self) -> None:
        with self._guard:
            self._thread, self._pid, self.stuck = None, 0, None
            self._jobs = queue.SimpleQueue()

    def call(self, function: str, args: tuple, timeout: float):
        stuck = self.stuck
        if stuck:
            return None, _not_answering(*stuck)
        done, box = threading.Event(), {}
        self._start().put((function, args, done, box))
        if not done.wait(timeout):
            with self._guard:
                if not done.is_set():     # it may have answered just now
                    self.stuck = self.stuck or (function, time.time())
                    return None, _not_answering(*self.stuck)
        return box["result"]

    def _start(self) -> queue.SimpleQueue:
        """The queue of a running NVML thread of this process (started here if need be)."""
        with self._guard:
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, args=(self._jobs,), name="nvml", daemon=True)
                self._thread.start()
            return self._jobs

    def _run(self, jobs: queue.SimpleQueue) -> None:
        while True:
            function, args, done, box = jobs.get()
            box["result"] = _raw_call(function, *args)
            with self._guard:
                if jobs is self._jobs:    # a thread forget() left behind clears no one else's state
                    self.stuck = None
                done.set()


def _not_answering(function: str, since: float) -> str:
    """One wording, the same on every call while one call is stuck, so the fault is logged once."""
    return f"NVML not answering ({function} has not returned since {time.strftime('%H:%M:%S', time.localtime(since))})"


_caller = _Caller()


def _after_fork() -> None:
    """A forked child starts afresh: new locks (another thread may have held one at the fork), no
    NVML session or thread of its parent's."""
    global _lock, _report_lock, _initialised, _caller
    _lock, _report_lock, _initialised, _caller = threading.Lock(), threading.Lock(), False, _Caller()
    _reported.clear()


os.register_at_fork(after_in_child=_after_fork)


def _ensure_initialised() -> str:
    """'' once NVML is up in this process; else why not (tried again on the next call)."""
    global _initialised
    with _lock:
        if _initialised:
            return ""
        _, fault = _call("nvmlInit", timeout=INIT_TIMEOUT_S)
        if fault:
            absent = fault in _NO_DRIVER
            _report({"init": f"NVML unavailable, no GPU figures ({fault})"}, clear=["init"],
                    level=logging.INFO if absent else logging.WARNING)
            return fault
        _report({}, clear=["init"])
        _initialised = True
        return ""


def _call(function: str, *args, timeout: float | None = None):
    """(result, '') or (None, what failed): the one guard around every NVML function."""
    return _caller.call(function, args, CALL_TIMEOUT_S if timeout is None else timeout)


def _raw_call(function: str, *args):
    try:
        return getattr(pynvml, function)(*args), ""
    except pynvml.NVMLError as e:
        return None, _describe(e)
    except Exception as e:  # noqa: BLE001 - a broken driver can fail in ctypes too: still no traceback
        return None, f"{type(e).__name__}: {e}"


def _handle(ident: str):
    if ident.startswith(("GPU-", "MIG-")):
        # Bytes: what every pynvml takes (older ones pass a str straight to ctypes and fail).
        handle, fault = _call("nvmlDeviceGetHandleByUUID", ident.encode())
        if handle is None and fault == _NOT_FOUND and ident.startswith("GPU-"):
            handle, fault = _call("nvmlDeviceGetHandleByUUID", ("MIG-" + ident[4:]).encode())
        return handle, fault
    try:
        index = int(ident)
    except ValueError:
        return None, f"not a GPU UUID or index: {ident!r}"
    return _call("nvmlDeviceGetHandleByIndex", index)


def _read(index: int, handle, fault: str, placed: bool) -> GpuInfo:
    """Every figure of one GPU, each read on its own so one unsupported figure loses only itself.

    ``placed``: the GPU is a candidate for placement, which a GPU in MIG mode is not: CUDA computes on
    its slices, not on the GPU its UUID names, and its free memory is not any one slice's.
    """
    if handle is None:
        return GpuInfo(index, "", fault=fault)
    name, _ = _call("nvmlDeviceGetName", handle)
    uuid, _ = _call("nvmlDeviceGetUUID", handle)
    pci, _ = _call("nvmlDeviceGetPciInfo", handle)
    memory, memory_fault = _call("nvmlDeviceGetMemoryInfo", handle)
    rates, util_fault = _call("nvmlDeviceGetUtilizationRates", handle)
    faults = [f"memory: {memory_fault}"] if memory_fault else []
    if placed and _mig_enabled(handle):
        faults.append("MIG mode is on: asrctl places instances on whole GPUs only")
    return GpuInfo(
        index=index,
        name=_text(name),
        memory_total_mb=memory.total // _MB if memory is not None else None,
        memory_free_mb=memory.free // _MB if memory is not None else None,
        utilization_pct=float(rates.gpu) if rates is not None else None,
        uuid=_text(uuid),
        pci_bus_id=_text(getattr(pci, "busId", "")),
        fault="; ".join(faults),
        # Not Supported (MIG, vGPU) is how such a GPU is, not a fault; the same error as memory's is
        # already said there.
        utilization_fault=util_fault if util_fault not in ("", _NOT_SUPPORTED, memory_fault) else "",
    )


def _mig_enabled(handle) -> bool:
    mode, fault = _call("nvmlDeviceGetMigMode", handle)
    return not fault and isinstance(mode, (list, tuple)) and mode[0] == pynvml.NVML_DEVICE_MIG_ENABLE


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else ""


def _report(faults: dict[str, str], clear: list[str] = (), level: int = logging.WARNING) -> None:
    """Log each distinct fault once while it lasts, and once when it clears: a lost GPU must not write
    a line per scrape or tick, and a fault that comes back must be seen again. Scrapes, the model
    loader and the memory thread report at the same time: one at a time here."""
    with _report_lock:
        for key in clear:
            if key in _reported and key not in faults:
                log.info("NVML %s: cleared (was: %s)", key, _reported.pop(key))
        for key, message in faults.items():
            if _reported.get(key) != message:
                _reported[key] = message
                log.log(level, "NVML %s: %s", key, message)
