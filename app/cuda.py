"""CUDA as this process sees it: which GPU is device 0, and where the CUDA libraries of pip's
``nvidia-*`` wheels are.

``current_device`` asks the CUDA driver (``libcuda.so.1``, which every engine's runtime goes through)
for device 0 after ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER`` have applied: the GPU the
engine really computes on, whatever engine it is. NVML numbers GPUs on its own, so asking NVML
about "the first visible GPU" would show the GPU placement intended and hide a wrong pin.
"""
from __future__ import annotations

import ctypes
import glob
import os
import site
import sys
import uuid as uuidlib


def current_device() -> dict | None:
    """{"uuid", "name", "pci_bus_id", "visible"} of CUDA device 0; None without a driver or a GPU."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    if cuda.cuInit(0) != 0:
        return None
    count = ctypes.c_int(0)
    device = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    if cuda.cuDeviceGet(ctypes.byref(device), 0) != 0:
        return None
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, len(name), device)
    raw = ctypes.create_string_buffer(16)
    get_uuid = getattr(cuda, "cuDeviceGetUuid_v2", None) or cuda.cuDeviceGetUuid
    uuid = "GPU-" + str(uuidlib.UUID(bytes=raw.raw)) if get_uuid(raw, device) == 0 else ""
    bus = ctypes.create_string_buffer(64)
    pci = bus.value.decode() if cuda.cuDeviceGetPCIBusId(bus, len(bus), device) == 0 else ""
    return {"uuid": uuid, "name": name.value.decode(errors="replace"), "pci_bus_id": pci,
            "visible": count.value}


def library_dirs() -> list[str]:
    """The ``lib`` folders of the ``nvidia-*`` wheels in this environment (cuBLAS, cuDNN, ...).

    CTranslate2 opens ``libcublas.so.12`` by name when it first runs on a GPU, so the dynamic loader
    must find it: an instance on ``cuda`` gets these on ``LD_LIBRARY_PATH`` (the image registers them
    with ldconfig instead). Empty on a CPU install, which has none of these wheels.
    """
    roots = [p for p in [*site.getsitepackages(), *sys.path] if p and os.path.isdir(os.path.join(p, "nvidia"))]
    found: list[str] = []
    for root in dict.fromkeys(roots):
        for lib in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib"))):
            if glob.glob(os.path.join(lib, "*.so*")) and lib not in found:
                found.append(lib)
    return found


def library_path(existing: str = "") -> str:
    """``LD_LIBRARY_PATH`` with the wheels' folders first, then what was there."""
    return ":".join(dict.fromkeys([*library_dirs(), *filter(None, existing.split(":"))]))
