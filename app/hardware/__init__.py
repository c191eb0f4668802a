"""The hardware boundary: NVML (GPU inventory and memory), CUDA libraries, CPU sets and pinning."""
