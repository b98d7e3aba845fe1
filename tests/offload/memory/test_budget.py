"""offload/memory/budget.py: the auto budget's arithmetic on mocked psutil / pynvml readings, and the fit error.

The tiny Mixtral (tests/tiny_models.py) is small enough to work every number out by hand: float32, hidden 32,
3 layers of 4 experts with intermediate 48, 2 kv heads of 8 dims, 256 positions.
"""

from __future__ import annotations

import math
import sys
import types
from collections import namedtuple

import pytest
import torch

import offload
from offload.checkpoint.plan import plan_checkpoint
from offload.errors import BudgetError
from offload.memory import budget
from offload.memory.budget import Placement
from offload.runtime.config import RuntimeConfig
from offload.runtime.load import fit_runtime_budget

MiB = 2**20
EXPERT = 3 * 32 * 48 * 4                 # one float32 expert: 18,432 bytes
KV = 2 * 3 * 2 * 8 * 256 * 16 * 4        # k and v, 3 layers, 2 heads x 8, 256 tokens, pool of 16 (batch 8), float32
VirtualMemory = namedtuple("VirtualMemory", "total available")


@pytest.fixture(scope="module")
def plan(tiny_dir):
    return plan_checkpoint(tiny_dir("mixtral"))


def dense_bytes(plan) -> int:
    return sum(math.prod(t.shape) for t in plan.dense.values()) * 4


def mock_ram(monkeypatch, available: int) -> None:
    monkeypatch.setattr(offload.hw.machine.psutil, "virtual_memory", lambda: VirtualMemory(64 * 2**30, available))


def mock_gpus(monkeypatch, *free: int) -> None:
    """A stand-in pynvml module reporting GPUs with these free bytes (80 GiB each)."""
    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: len(free),
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetName=lambda i: b"Fake H100",
        nvmlDeviceGetMemoryInfo=lambda i: types.SimpleNamespace(total=80 * 2**30, free=free[i], used=0))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


def resolve(plan, device="cpu", **runtime):
    return fit_runtime_budget(plan, RuntimeConfig(**runtime), torch.float32, torch.device(device))


CPU = torch.device("cpu")


def test_kv_and_context_arithmetic(plan):
    assert budget.kv_context(plan.spec) == 256            # max positions under the 4096 cap
    assert budget.kv_context(plan.spec, 100) == 100
    assert budget.kv_nbytes(plan.spec, torch.float32, 256, 16) == KV == 1_572_864
    assert budget.kv_nbytes(plan.spec, torch.bfloat16, 256, 16) == KV // 2


def test_auto_on_the_cpu_takes_what_is_left_after_dense_kv_ram_tier_and_headroom(plan, monkeypatch):
    # RAM tier on the CPU: slots are the packed layout (18,432 bytes), and the tier's 12 experts come first.
    free = 600 * MiB + dense_bytes(plan) + KV + 12 * EXPERT + 5 * EXPERT + 100
    mock_ram(monkeypatch, free)
    mp = budget.memory_plan(plan, Placement(CPU, torch.float32, "ram"))
    assert (mp.free, mp.dense, mp.kv, mp.ram_tier) == (free, dense_bytes(plan), KV, 12 * EXPERT)
    assert mp.headroom == 512 * MiB                        # 10% of ~600 MiB is 60 MiB: the floor wins
    assert mp.for_experts == 88 * MiB + 5 * EXPERT + 100
    assert mp.slots == 12                                  # 88 MiB hold every expert


def test_headroom_floor_and_fraction(plan, monkeypatch):
    for free, headroom in ((2 * 2**30, 512 * MiB), (20 * 2**30, 2 * 2**30)):
        mock_ram(monkeypatch, free)
        mp = budget.memory_plan(plan, Placement(CPU, torch.float32))
        assert mp.headroom == headroom


def test_auto_resolves_to_the_slots_that_fit(plan, monkeypatch):
    mock_ram(monkeypatch, 512 * MiB + dense_bytes(plan) + KV + 12 * EXPERT + 5 * EXPERT + 100)
    assert resolve(plan, expert_budget="auto", offload_to="ram").expert_budget == 5
    mock_ram(monkeypatch, 8 * 2**30)                       # plenty: every expert, never more
    assert resolve(plan, expert_budget="auto", offload_to="ram").expert_budget == 12


def test_a_longer_context_and_a_bigger_batch_leave_fewer_slots(plan, monkeypatch):
    base = 512 * MiB + dense_bytes(plan) + 12 * EXPERT + 100
    mock_ram(monkeypatch, base + KV + 6 * EXPERT)
    assert resolve(plan, expert_budget="auto", offload_to="ram").expert_budget == 6
    # context 512 doubles the KV cache: KV / EXPERT = 85.3 slots' worth more, so none of the 6 is left
    with pytest.raises(BudgetError, match="not one expert slot fits"):
        resolve(plan, expert_budget="auto", offload_to="ram", context=512)
    mock_ram(monkeypatch, base + KV // 16 + 6 * EXPERT)    # batch 1: a pool of 2 rows, not 16 (KV / 8)
    assert resolve(plan, expert_budget="auto", offload_to="ram", batch_size=1, context=128).expert_budget == 6


def test_auto_on_cuda_reads_that_gpu_from_pynvml(plan, monkeypatch):
    mock_ram(monkeypatch, 1 * MiB)                         # host RAM is not where CUDA slots go
    mock_gpus(monkeypatch, 10 * 2**30, 512 * MiB + dense_bytes(plan) + KV + 3 * EXPERT + 7)
    assert budget.free_memory(torch.device("cuda:1")).name == "GPU 1 (Fake H100)"
    # on CUDA the RAM tier is in host memory: not subtracted from the GPU's
    assert resolve(plan, "cuda:1", expert_budget="auto", offload_to="ram").expert_budget == 3
    assert resolve(plan, "cuda", expert_budget="auto", offload_to="ram").expert_budget == 12   # cuda = GPU 0


def test_the_disk_tier_counts_the_aligned_read_per_slot(plan):
    layout = plan.expert_format.slot_layout(plan.spec, torch.float32, torch.device("cpu"), "int8")
    disk = budget.slot_nbytes(plan, "disk", layout, CPU)
    assert budget.slot_nbytes(plan, "ram", layout, CPU) == layout.nbytes == EXPERT
    assert disk >= EXPERT and disk % 4096 == 0


def test_an_explicit_budget_that_fits_is_left_alone(plan, monkeypatch):
    mock_ram(monkeypatch, 8 * 2**30)
    assert resolve(plan, expert_budget="25%").expert_budget == "25%"


def test_an_explicit_budget_that_does_not_fit_says_what_does(plan, monkeypatch):
    mock_ram(monkeypatch, 512 * MiB + dense_bytes(plan) + KV + 12 * EXPERT + 5 * EXPERT + 100)
    with pytest.raises(BudgetError) as e:
        resolve(plan, expert_budget="100%", offload_to="ram")
    text = str(e.value)
    assert "expert budget '100%' (12 slots, 0.2 MiB) does not fit" in text
    assert "of RAM free" in text and "headroom" in text and "\n" not in text
    assert e.value.hint == "--expert-budget 5 (42%) fits, as does --expert-budget auto"


def test_the_fit_error_comes_before_any_weight_is_read(tiny_dir, monkeypatch):
    mock_ram(monkeypatch, 100 * MiB)                       # under the headroom floor: nothing fits

    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read before the budget was checked")

    monkeypatch.setattr(offload.runtime.assemble, "read_tensor", no_reads)
    monkeypatch.setattr(offload.memory.transfer.DirectReader, "read", no_reads)
    with pytest.raises(BudgetError, match="does not fit"):
        offload.from_pretrained(tiny_dir("mixtral"), device="cpu", expert_budget=4)
    with pytest.raises(BudgetError, match="not one expert slot fits"):
        offload.from_pretrained(tiny_dir("mixtral"), device="cpu", expert_budget="auto")


def test_auto_is_a_valid_runtime_budget_and_loads_every_expert_of_a_tiny_model(tiny_dir):
    assert RuntimeConfig(expert_budget=" AUTO ").expert_budget == " AUTO "
    m = offload.from_pretrained(tiny_dir("mixtral"), device="cpu", expert_budget="auto")
    assert m.runtime.expert_budget == m.cache.num_slots == 12
