"""A fake NVML at the library boundary: the ``pynvml`` module's own functions are swapped for ones that
answer from a list of fake GPUs, and raise pynvml's real error classes for the faults real GPUs have
(``GpuIsLost`` for a GPU that fell off the bus, ``NotSupported`` for utilization on MIG or vGPU and
for the process list where it is not offered), and answer ``usedGpuMemory=None`` for a process whose
memory NVML cannot tell (MIG, some containers), as pynvml does.
Everything above pynvml (``app.hardware.nvml``, placement, the autoscaler, ``/metrics``, ``asrctl status``) is
the real code. No GPU exists on the test machines: this is the hardware boundary.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml

MB = 2**20


@dataclass
class FakeGpu:
    name: str
    total_mb: int
    used_mb: int = 0
    util: int = 0
    uuid: str = ""
    pci_bus_id: str = ""
    processes: dict[int, int] = field(default_factory=dict)   # pid -> MB it holds
    lost: bool = False              # fell off the bus: every query raises GpuIsLost
    util_not_supported: bool = False  # MIG / vGPU: utilization raises NotSupported
    mig: bool | None = None         # MIG mode on (True) or off (False); None: no MIG on this GPU
    hang: threading.Event | None = None   # until it is set, every query blocks (a GPU falling off the bus)
    process_memory_hidden: bool = False   # MIG, some containers: processes listed with usedGpuMemory None
    processes_not_supported: bool = False  # vGPU and others: the process list raises NotSupported


class FakeNvml:
    def __init__(self, gpus: list[FakeGpu], driver: bool = True, slices: list[FakeGpu] = (),
                 init_error: int | None = None):
        self.gpus = gpus
        self.slices = list(slices)     # MIG slices: found by their MIG-... UUID only, as in NVML
        self.driver = driver
        self.init_error = init_error   # an NVML error code nvmlInit raises (a broken driver)
        self.calls = 0
        for i, g in enumerate(gpus):
            # Hex letters, as real UUIDs have: a comparison that minds the case would fail.
            g.uuid = g.uuid or f"GPU-{i:08x}-abcd-ef01-2345-{i:012x}"
            g.pci_bus_id = g.pci_bus_id or f"00000000:{0x10 + i:02X}:00.0"

    def install(self, monkeypatch) -> "FakeNvml":
        import app.hardware.nvml

        for name in ("nvmlInit", "nvmlShutdown", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex",
                     "nvmlDeviceGetHandleByUUID", "nvmlDeviceGetIndex", "nvmlDeviceGetName", "nvmlDeviceGetUUID",
                     "nvmlDeviceGetPciInfo", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUtilizationRates",
                     "nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetMigMode"):
            monkeypatch.setattr(pynvml, name, getattr(self, name))
        app.hardware.nvml.reset()
        monkeypatch.setattr(app.hardware.nvml, "_reported", {})
        return self

    # -- pynvml's functions --

    def nvmlInit(self):
        self.calls += 1
        if not self.driver:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for g in [*self.gpus, *self.slices]:
            if g.uuid == uuid:
                return g
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def _alive(self, g: FakeGpu) -> FakeGpu:
        if g.hang is not None:
            g.hang.wait(60)     # until the test lets it answer (bounded: a broken test must not hang)
        if g.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return g

    def nvmlDeviceGetIndex(self, handle):
        if handle in self.slices:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus.index(handle)

    def nvmlDeviceGetName(self, handle):
        return self._alive(handle).name

    def nvmlDeviceGetUUID(self, handle):
        return self._alive(handle).uuid

    def nvmlDeviceGetPciInfo(self, handle):
        return SimpleNamespace(busId=self._alive(handle).pci_bus_id)

    def nvmlDeviceGetMemoryInfo(self, handle):
        g = self._alive(handle)
        used = g.used_mb + sum(g.processes.values())
        return SimpleNamespace(total=g.total_mb * MB, used=used * MB, free=(g.total_mb - used) * MB)

    def nvmlDeviceGetUtilizationRates(self, handle):
        g = self._alive(handle)
        if g.util_not_supported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=g.util, memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        g = self._alive(handle)
        if g.processes_not_supported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        # pynvml gives None where NVML answers NVML_VALUE_NOT_AVAILABLE for a process's memory.
        return [SimpleNamespace(pid=pid, usedGpuMemory=None if g.process_memory_hidden else mb * MB)
                for pid, mb in g.processes.items()]

    def nvmlDeviceGetMigMode(self, handle):
        g = self._alive(handle)
        if g.mig is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if g.mig else pynvml.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]


def cuda_sees(monkeypatch, g: FakeGpu) -> None:
    """CUDA's device 0 (``app.hardware.cuda.current_device``, the CUDA driver's answer) is ``g``: the other half
    of the hardware boundary, for an instance that loads on ``cuda`` here."""
    import app.hardware.cuda

    monkeypatch.setattr(app.hardware.cuda, "current_device", lambda: {"uuid": g.uuid, "name": g.name,
                                                             "pci_bus_id": g.pci_bus_id, "visible": 1})
