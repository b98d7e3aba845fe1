"""What this machine is: memory (psutil for RAM, pynvml for GPUs when there are any), and the
description every benchmark and sweep stores beside its numbers so they can be reproduced."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

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


def _cpu_model() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                platform.processor())


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(packages: tuple[str, ...] = ("offload", "torch", "numpy", "numba", "safetensors",
                                              "transformers")) -> dict[str, Any]:
    """CPU model, cores, RAM, GPUs, platform, Python and library versions (None where not installed)."""
    ram = host_memory()
    return {"cpu_model": _cpu_model(), "cores": os.cpu_count(), "ram_bytes": ram.total,
            "gpus": [asdict(g) for g in gpu_memories()], "platform": platform.platform(),
            "python": platform.python_version(), "versions": {p: _version(p) for p in packages}}
