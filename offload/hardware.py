"""What memory this machine has: psutil for RAM, pynvml for GPU memory when a GPU is there."""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Memory:
    name: str
    total: int
    available: int


def host_memory() -> Memory:
    vm = psutil.virtual_memory()
    return Memory("RAM", vm.total, vm.available)


def gpu_memories() -> list[Memory]:
    """One entry per NVIDIA GPU; empty without a driver (pynvml raises, which is the normal case here)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver or library: simply no GPUs
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            out.append(Memory(f"GPU {i} ({name if isinstance(name, str) else name.decode()})", info.total, info.free))
        return out
    finally:
        pynvml.nvmlShutdown()
