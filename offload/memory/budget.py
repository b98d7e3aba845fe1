"""The ``auto`` expert budget: the most expert slots this machine holds, and the check that a given budget fits.

A budget of 100% is what a small model wants and what a real one cannot have: Mixtral-8x7B's experts are
87 GiB. So ``auto`` asks the memory the slots will live in how much is free now (pynvml for a CUDA device,
psutil for host RAM on the CPU) and takes away, in this order:

- the dense weights (attention, norms, embeddings, routers) in the compute dtype;
- the KV cache: 2 (keys, values) x layers x kv heads x head dim x ``context`` tokens x the batching pool's
  sequences (2 x batch size, as BatchConfig.pool), in the compute dtype;
- on the CPU with ``offload_to="ram"``, the RAM tier itself (every expert packed in host memory);
- a headroom of 10% of the free memory, at least 512 MiB, for what nobody sizes in advance: a forward's
  activations and logits, the allocator's slack, the tokenizer, Python and torch themselves.

What is left, divided by one slot's bytes (the slot layout, or the aligned raw read of the disk tier when that
is larger: what the mover allocates), is the number of slots, at most every expert. An explicit budget larger
than that gets a one-line :class:`BudgetError` saying what fits. Both happen in ``from_pretrained`` after the
checkpoint's headers are read and before any weight is.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from offload.amounts import parse_budget
from offload.checkpoint.plan import CheckpointPlan
from offload.errors import BudgetError
from offload.experts.layouts import ExpertLayout
from offload.hw.machine import Memory, gpu_memories, host_memory
from offload.memory import transfer
from offload.memory.transfer import DirectReader, DiskExpertStore
from offload.model.attention import attention_class
from offload.runtime.batch import BatchConfig
from offload.runtime.config import RuntimeConfig
from offload.spec import ModelSpec

log = logging.getLogger(__name__)

HEADROOM_FRACTION = 0.10         # of the free memory
HEADROOM_MIN_BYTES = 512 * 2**20  # a prefill's activations alone reach tens of MiB on a real model
DEFAULT_CONTEXT_CAP = 4096       # tokens per sequence when no context is given (the model's max positions if less)


def is_auto(budget: int | str) -> bool:
    return isinstance(budget, str) and budget.strip().lower() == "auto"


def kv_context(spec: ModelSpec, context: int = 0) -> int:
    """Tokens per sequence the KV cache is made for: ``context``, or the model's max positions capped at 4096."""
    return context or min(spec.max_position_embeddings, DEFAULT_CONTEXT_CAP)


def kv_nbytes(spec: ModelSpec, dtype: torch.dtype, context: int, sequences: int, attention: str = "gqa") -> int:
    """Bytes of keys and values for ``sequences`` rows of ``context`` tokens (KVCache / KVPool's storage)."""
    (kh, kd), (vh, vd) = attention_class(attention).cache_shapes(spec)  # MLA stores a latent, not heads
    return spec.num_layers * (kh * kd + vh * vd) * context * sequences * dtype.itemsize


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    """Where the expert slots go and what else must fit there first; ``slots`` is the auto budget."""

    memory: str          # "RAM" or "GPU 0 (name)"
    free: int            # bytes free there now
    dense: int           # resident weights in the compute dtype
    kv: int              # the KV cache for the context and batch
    ram_tier: int        # every expert packed in host RAM (CPU device with offload_to="ram"), else 0
    headroom: int
    slot_nbytes: int     # one cache slot
    total_experts: int

    @property
    def for_experts(self) -> int:
        return self.free - self.dense - self.kv - self.ram_tier - self.headroom

    @property
    def slots(self) -> int:
        return max(0, min(self.total_experts, self.for_experts // self.slot_nbytes))

    def describe(self) -> str:
        """One line of the arithmetic, e.g. for the error of a budget that does not fit."""
        tier = f" - {_gib(self.ram_tier)} RAM tier" if self.ram_tier else ""
        return (f"{_gib(self.free)} of {self.memory} free - {_gib(self.dense)} dense weights - {_gib(self.kv)} "
                f"KV cache{tier} - {_gib(self.headroom)} headroom leaves {_gib(max(self.for_experts, 0))} "
                f"for experts of {_gib(self.slot_nbytes)}")


def free_memory(device: torch.device) -> Memory:
    """The memory expert slots on ``device`` live in: the GPU's (pynvml, by the device's index) or host RAM."""
    if device.type != "cuda":
        return host_memory()
    index = device.index if device.index is not None else 0
    gpus = gpu_memories()
    if index < len(gpus):
        return gpus[index]
    free, total = torch.cuda.mem_get_info(device)  # no NVML (e.g. a container without the library): ask CUDA
    return Memory(f"GPU {index}", total, free)


def slot_nbytes(plan: CheckpointPlan, runtime: RuntimeConfig, slot_layout: ExpertLayout,
                device: torch.device | None = None) -> int:
    """One slot's bytes, as the mover allocates it (a disk read that lands in the slot needs its aligned span)."""
    if runtime.offload_to != "disk":
        return slot_layout.nbytes
    # DirectReader opens nothing until a read, so this reads no bytes: only the tensors' places are used.
    store = DiskExpertStore(plan.experts, DirectReader(), plan.source_layout)
    return transfer.slot_nbytes(store, slot_layout, device or torch.device("cpu"))


def memory_plan(plan: CheckpointPlan, runtime: RuntimeConfig, slot_bytes: int, layout_nbytes: int,
                dtype: torch.dtype, device: torch.device) -> MemoryPlan:
    """The arithmetic of the module docstring for this checkpoint, runtime and device."""
    spec = plan.spec
    memory = free_memory(device)
    sequences = BatchConfig(batch_size=runtime.batch_size).pool
    dense = sum(math.prod(t.shape) for t in plan.dense.values()) * dtype.itemsize
    ram_tier = spec.total_experts * layout_nbytes if device.type != "cuda" and runtime.offload_to == "ram" else 0
    headroom = max(HEADROOM_MIN_BYTES, int(memory.available * HEADROOM_FRACTION))
    return MemoryPlan(memory.name, memory.available, dense,
                      kv_nbytes(spec, dtype, kv_context(spec, runtime.context), sequences, plan.family.attention),
                      ram_tier, headroom,
                      slot_bytes, spec.total_experts)


def resolve_expert_budget(plan: CheckpointPlan, runtime: RuntimeConfig, slot_layout: ExpertLayout,
                          dtype: torch.dtype, device: torch.device) -> RuntimeConfig:
    """``runtime`` with an ``auto`` budget replaced by the slots that fit; an explicit budget is checked to fit.

    Raises BudgetError (one line: the arithmetic and what does fit) when nothing fits or the budget is too big.
    """
    slot_bytes = slot_nbytes(plan, runtime, slot_layout, device)
    mp = memory_plan(plan, runtime, slot_bytes, slot_layout.nbytes, dtype, device)
    total = plan.spec.total_experts
    if is_auto(runtime.expert_budget):
        if mp.slots < 1:
            raise BudgetError(f"expert budget auto: not one expert slot fits ({mp.describe()})", _NOTHING_FITS)
        log.info("expert budget auto: %d of %d experts (%s)", mp.slots, total, mp.describe())
        return dataclasses.replace(runtime, expert_budget=mp.slots)
    asked = parse_budget(runtime.expert_budget, total, slot_bytes)
    if asked > mp.slots:
        hint = (f"--expert-budget {mp.slots} ({mp.slots / total:.0%}) fits, as does --expert-budget auto"
                if mp.slots else _NOTHING_FITS)
        raise BudgetError(f"expert budget {runtime.expert_budget!r} ({asked} slots, {_gib(asked * slot_bytes)}) "
                          f"does not fit: {mp.describe()}", hint)
    return runtime


_NOTHING_FITS = "free some memory, lower --context or the batch size, or use a smaller --dtype"
