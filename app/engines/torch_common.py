"""What the two torch engines (transformers Whisper, Qwen3-ASR) share: precisions and their names."""
from __future__ import annotations

import torch

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_compute_type(compute_type: str, device: str, gpu_default: str = "float16") -> str:
    """``auto``: ``gpu_default`` on a GPU, float32 on a CPU (half precision there is slow or missing)."""
    if compute_type == "auto":
        return gpu_default if device == "cuda" else "float32"
    if compute_type not in TORCH_DTYPES:
        raise ValueError(f"compute_type {compute_type!r}: torch engines run {sorted(TORCH_DTYPES)}")
    return compute_type


def reserved_gpu_memory_mb(device: str) -> int | None:
    """GPU memory torch's caching allocator holds for this process, on cuda only: what an instance
    reports where NVML cannot see the process's own figure (some containers)."""
    if device != "cuda":
        return None
    return int(torch.cuda.memory_reserved()) // 2**20
