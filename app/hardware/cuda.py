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
import importlib.metadata
import os
import re
import site
import sys
import uuid as uuidlib


def current_device() -> dict | None:
    """{"uuid", "name", "pci_bus_id", "visible"} of CUDA device 0; None on a host without the CUDA
    driver library. When the driver is there but cannot give a device (no GPU visible, a pin to a GPU
    that is gone, a driver fault), {"error": ...} with the driver's own error name, so nothing can
    take the GPU placement meant for the one CUDA uses."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count = ctypes.c_int(0)
    device = ctypes.c_int(0)
    for call, args in (("cuInit", (0,)), ("cuDeviceGetCount", (ctypes.byref(count),)),
                       ("cuDeviceGet", (ctypes.byref(device), 0))):
        status = getattr(cuda, call)(*args)
        if status != 0:
            return {"error": f"{call}: {_error_name(cuda, status)}"}
        if call == "cuDeviceGetCount" and count.value < 1:
            return {"error": "cuDeviceGetCount: no CUDA device visible "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"}
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, len(name), device)
    raw = ctypes.create_string_buffer(16)
    get_uuid = getattr(cuda, "cuDeviceGetUuid_v2", None) or cuda.cuDeviceGetUuid
    # CUDA gives 16 bytes; NVML writes a whole GPU's as GPU-<8-4-4-4-12 hex> (a MIG slice's as MIG-...,
    # which app.hardware.nvml also finds under GPU-).
    uuid = "GPU-" + str(uuidlib.UUID(bytes=raw.raw)) if get_uuid(raw, device) == 0 else ""
    bus = ctypes.create_string_buffer(64)
    pci = bus.value.decode() if cuda.cuDeviceGetPCIBusId(bus, len(bus), device) == 0 else ""
    return {"uuid": uuid, "name": name.value.decode(errors="replace"), "pci_bus_id": pci,
            "visible": count.value}


def same_gpu(a: str, b: str) -> bool:
    """Two UUIDs of one device, whatever the case and whether a MIG slice is written GPU- or MIG-."""
    def bare(u: str) -> str:
        u = u.strip().lower()
        return u[4:] if u.startswith(("gpu-", "mig-")) else u
    return bool(a) and bool(b) and bare(a) == bare(b)


def _error_name(cuda, status: int) -> str:
    """CUDA_ERROR_NO_DEVICE (100), say: the driver's own name for a CUresult."""
    name = ctypes.c_char_p()
    if cuda.cuGetErrorName(status, ctypes.byref(name)) == 0 and name.value:
        return f"{name.value.decode()} ({status})"
    return f"CUresult {status}"


def library_dirs() -> list[str]:
    """The ``lib`` folders of the ``nvidia-*`` wheels in this environment (cuBLAS, cuDNN, ...).

    CTranslate2 opens ``libcublas.so.12`` by name when it first runs on a GPU, so the dynamic loader
    must find it: an instance on ``cuda`` gets these on ``LD_LIBRARY_PATH`` (the image registers them
    with ldconfig instead). Empty on a CPU install, which has none of these wheels. Taking every folder
    is right because an environment holds one CUDA major (scripts/setup.sh chooses it, and
    ``wheel_clashes`` fails the set-up otherwise): CUDA 12 wheels each have their own folder
    (``nvidia/cublas/lib``, ``nvidia/cudnn/lib``), CUDA 13 ones share ``nvidia/cu13/lib`` (cuDNN for
    CUDA 13 is still ``nvidia/cudnn/lib``), and no library is found twice under two builds.
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


def wheel_clashes(path: list[str] | None = None) -> list[str]:
    """What breaks the one-CUDA-major rule in this environment (``path``: where to look for installed
    distributions, default ``sys.path``), one line each; empty when nothing does.

    ``nvidia-cudnn-cu12`` and ``nvidia-cudnn-cu13`` both install ``nvidia/cudnn/lib/libcudnn*.so.9``:
    pip writes the second over the first without a word, an engine then runs on the other CUDA's
    cuDNN, and uninstalling either deletes the other's files. So: at most one ``nvidia-cudnn-cu*``
    distribution, and no shared library that two distributions both list in their RECORD.
    """
    dists = list(importlib.metadata.distributions(path=path) if path is not None
                 else importlib.metadata.distributions())
    cudnn = sorted({n for n in (_normalized(d) for d in dists) if re.fullmatch(r"nvidia-cudnn-cu\d+", n)})
    problems = [f"two cuDNN builds installed: {', '.join(cudnn)}"] if len(cudnn) > 1 else []
    owners: dict[str, set[str]] = {}
    for dist in dists:
        for file in dist.files or ():
            if file.parts[:1] == ("nvidia",) and ".so" in file.name:
                owners.setdefault(os.path.realpath(dist.locate_file(file)), set()).add(_normalized(dist))
    problems += [f"{path} is installed by {' and '.join(sorted(names))}"
                 for path, names in sorted(owners.items()) if len(names) > 1]
    return problems


def _normalized(dist: importlib.metadata.Distribution) -> str:
    return re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()


if __name__ == "__main__":
    # scripts/setup.sh and the Dockerfile run this after installing: a clash fails the set-up loudly.
    clashes = wheel_clashes()
    for line in clashes:
        print(f"app.hardware.cuda: {line}", file=sys.stderr)
    if clashes:
        print("app.hardware.cuda: one CUDA major per environment (see scripts/setup.sh)", file=sys.stderr)
    sys.exit(1 if clashes else 0)
