"""offload/hw/machine.py: host memory from psutil, no GPUs without a driver, machine info for results."""

from __future__ import annotations

import builtins

from offload.hw.machine import gpu_memories, host_memory, machine_info


def test_host_memory_is_sane():
    m = host_memory()
    assert m.name == "RAM" and 0 < m.available <= m.total


def test_no_driver_means_no_gpus(monkeypatch):
    real_import = builtins.__import__

    def no_pynvml(name, *args, **kwargs):
        if name == "pynvml":
            raise ImportError("no NVML here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    assert gpu_memories() == []


def test_machine_info_names_the_machine_and_versions():
    info = machine_info()
    assert info["cores"] >= 1 and info["cpu_model"] and info["versions"]["torch"]
    assert isinstance(info["gpus"], list)
