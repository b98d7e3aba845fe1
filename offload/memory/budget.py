"""The one fit check: how many expert slots this machine holds for a checkpoint run a given way.

``offload run / serve / chat`` (``--expert-budget auto``, and the check of an explicit budget), ``offload info``
(its suggestion) and ``offload plan`` (which budgets fit) all ask :func:`memory_plan`, so they cannot disagree.

A budget of 100% is what a small model wants and what a real one cannot have: Mixtral-8x7B's experts are
87 GiB. So the memory the slots will live in is asked how much is free now (pynvml for a CUDA device, psutil
for host RAM on the CPU), and from it are taken, in this order:

- the dense weights (attention, norms, embeddings, routers) in the compute dtype;
- the KV cache: 2 (keys, values) x layers x kv heads x head dim x ``context`` tokens x the sequences the run
  keeps (the batching pool: 2 x batch size, as BatchConfig.pool), in the compute dtype; linear-attention layers
  keep no keys or values but a fixed-size state per sequence, counted once per sequence whatever the context;
- on the CPU with the RAM tier, the tier itself (every expert in its host layout); on CUDA the tier lives in
  host RAM instead, which must hold it (else nothing fits);
- a headroom of 10% of the free memory, at least 512 MiB, for what nobody sizes in advance: a forward's
  activations and logits, the allocator's slack, the tokenizer, Python and torch themselves.

What is left, divided by one slot's bytes (the slot layout, or the aligned raw read of the disk tier when that
is larger: what the mover allocates), is the number of slots, at most every expert. An explicit budget larger
than that gets a one-line :class:`BudgetError` saying what fits; when the resident part alone does not fit, the
error (and ``offload info``) says so with the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from offload.amounts import parse_budget
from offload.checkpoint.plan import CheckpointPlan, ConfigPlan
from offload.errors import BudgetError
from offload.experts.layouts import SlotLayout
from offload.hw.machine import Memory, gpu_memories, host_memory
from offload.memory import transfer
from offload.memory.transfer import DirectReader, DiskExpertStore
from offload.model.attention import attention_class
from offload.spec import ModelSpec

HEADROOM_FRACTION = 0.10         # of the free memory
HEADROOM_MIN_BYTES = 512 * 2**20  # a prefill's activations alone reach tens of MiB on a real model
DEFAULT_CONTEXT_CAP = 4096       # tokens per sequence when no context is given (the model's max positions if less)
DEFAULT_SEQUENCES = 16           # the batching pool of the default batch size (8): what run, serve and chat reserve
NOTHING_FITS = "free some memory, lower --context or the batch size, or use a smaller --dtype"

Plan = CheckpointPlan | ConfigPlan  # a checkpoint read with its headers, or its config.json alone (sizes estimated)


def is_auto(budget: int | str) -> bool:
    return isinstance(budget, str) and budget.strip().lower() == "auto"


def kv_context(spec: ModelSpec, context: int = 0) -> int:
    """Tokens per sequence the KV cache is made for: ``context``, or the model's max positions capped at 4096."""
    return context or min(spec.max_position_embeddings, DEFAULT_CONTEXT_CAP)


def sequence_nbytes(spec: ModelSpec, dtype: torch.dtype, pieces: Sequence[str] | None = None) -> tuple[int, int]:
    """What one sequence keeps over all layers (KVCache / KVPool's storage): (bytes per token of context, fixed bytes).

    Keys and values per token in the layers that keep them (MLA a latent, not heads); a fixed-size state in those
    that keep one (Gated DeltaNet's conv inputs and float32 recurrent state), constant in the context. ``pieces``:
    each layer's attention piece (Family.layer_pieces; default GQA everywhere)."""
    stores = [attention_class(p).store(spec) for p in (pieces or ["gqa"] * spec.num_layers)]
    return sum(s.token_nbytes(dtype) for s in stores), sum(s.state_nbytes(dtype) for s in stores)


def kv_nbytes(spec: ModelSpec, dtype: torch.dtype, context: int, sequences: int,
              pieces: Sequence[str] | None = None) -> int:
    """Bytes of what ``sequences`` rows of ``context`` tokens keep (sequence_nbytes, times the rows)."""
    per_token, fixed = sequence_nbytes(spec, dtype, pieces)
    return (per_token * context + fixed) * sequences


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Placement:
    """How a run places a checkpoint: what the fit check needs to know of it besides the checkpoint."""

    device: torch.device
    dtype: torch.dtype                          # the compute dtype (dense weights, KV cache, float slots)
    tier: str = "disk"                          # where experts live when not cached: "disk" or "ram"
    activations: str = "int8"   # --quant-activations of quantized experts (they pick the slot layout)
    context: int = 0                            # tokens per sequence (0: kv_context's default)
    sequences: int = DEFAULT_SEQUENCES          # KV cache rows


def slot_nbytes(plan: Plan, tier: str, slot_layout: SlotLayout, device: torch.device) -> int:
    """One slot's bytes, as the mover allocates it: a disk read that lands in the slot needs its aligned span
    (known from the headers; from config.json alone the layout's bytes are the estimate)."""
    if tier != "disk" or not isinstance(plan, CheckpointPlan):
        return slot_layout.nbytes
    # DirectReader opens nothing until a read, so this reads no bytes: only the tensors' places are used.
    store = DiskExpertStore(plan.experts, DirectReader(), plan.source_layout)
    return transfer.slot_nbytes(store, slot_layout, device)


@dataclass(frozen=True)
class Footprint:
    """What a placed checkpoint needs in memory, in bytes."""

    dense: int           # resident weights in the compute dtype
    kv: int              # the KV cache for the context and sequences
    slot: int            # one expert cache slot
    ram_tier: int        # every expert in the RAM tier's host layout (0 for the disk tier)
    total_experts: int


def ram_tier_nbytes(plan: Plan, placement: Placement) -> int:
    """Every expert in its host layout (a GGUF file's layers may differ in type): what RamExpertStore allocates."""
    spec, fmt, p = plan.spec, plan.expert_format, placement
    if not isinstance(plan, CheckpointPlan):  # config.json alone: one format for every layer
        return spec.total_experts * fmt.host_layout(spec, p.dtype, p.device, p.activations).nbytes
    return transfer.ram_tier_nbytes(plan.experts, plan.host_layout(p.dtype, p.device, p.activations))


def footprint(plan: Plan, placement: Placement) -> Footprint:
    spec, fmt, p = plan.spec, plan.expert_format, placement
    layout = fmt.slot_layout(spec, p.dtype, p.device, p.activations)
    kv = kv_nbytes(spec, p.dtype, kv_context(spec, p.context), p.sequences, plan.family.layer_pieces(spec))
    ram_tier = ram_tier_nbytes(plan, p) if p.tier == "ram" else 0
    return Footprint(plan.dense_numel * p.dtype.itemsize, kv, slot_nbytes(plan, p.tier, layout, p.device), ram_tier,
                     spec.total_experts)


@dataclass(frozen=True)
class MemoryPlan:
    """Where the expert slots go, what else must fit there first, and so how many slots fit (``slots``)."""

    memory: str          # "RAM" or "GPU 0 (name)"
    free: int            # bytes free there now
    dense: int
    kv: int
    ram_tier: int        # the RAM tier when it shares this memory (the CPU device), else 0
    headroom: int
    slot_nbytes: int
    total_experts: int
    host_short: int = 0  # on CUDA: bytes the RAM tier lacks in host RAM (0: it fits, or there is none)

    @property
    def resident(self) -> int:
        """What must fit before any slot: dense weights, KV cache, the RAM tier here, and the headroom."""
        return self.dense + self.kv + self.ram_tier + self.headroom

    @property
    def for_experts(self) -> int:
        return self.free - self.resident

    @property
    def slots(self) -> int:
        if self.host_short:
            return 0
        return max(0, min(self.total_experts, self.for_experts // self.slot_nbytes))

    def describe(self) -> str:
        """One line of the arithmetic, e.g. for the error of a budget that does not fit."""
        tier = f" - {gib(self.ram_tier)} RAM tier" if self.ram_tier else ""
        return (f"{gib(self.free)} of {self.memory} free - {gib(self.dense)} dense weights - {gib(self.kv)} "
                f"KV cache{tier} - {gib(self.headroom)} headroom leaves {gib(max(self.for_experts, 0))} "
                f"for experts of {gib(self.slot_nbytes)}")

    def shortfall(self, what: str = "the model") -> str | None:
        """Why not one slot fits, naming the part that does not ("this machine cannot hold ..."), or None."""
        if self.host_short:
            return (f"the RAM tier ({gib(self.host_short)} short in host RAM) does not fit: use --offload-to disk")
        if self.slots >= 1:
            return None
        parts = [f"dense weights {gib(self.dense)}", f"KV cache {gib(self.kv)}"]
        parts += [f"RAM tier {gib(self.ram_tier)}"] if self.ram_tier else []
        need = " + ".join(parts + [f"headroom {gib(self.headroom)}"])
        if self.resident > self.free:
            return f"{need} > {gib(self.free)} of {self.memory} free: this machine cannot hold {what}'s resident part"
        return f"{need} leave {gib(self.for_experts)} of {gib(self.free)} free, less than one expert of " \
               f"{gib(self.slot_nbytes)}"


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


def memory_plan(plan: Plan, placement: Placement, memory: Memory | None = None,
                host: Memory | None = None) -> MemoryPlan:
    """The arithmetic of the module docstring for this checkpoint and placement. ``memory``: where the slots go
    (default: free_memory of the device); ``host``: host RAM, for the RAM tier of a CUDA run (default: psutil)."""
    fp = footprint(plan, placement)
    memory = memory or free_memory(placement.device)
    on_host = placement.device.type != "cuda"
    host_short = 0
    if not on_host and fp.ram_tier:
        host = host or host_memory()
        host_short = max(0, fp.ram_tier - host.available)
    headroom = max(HEADROOM_MIN_BYTES, int(memory.available * HEADROOM_FRACTION))
    return MemoryPlan(memory.name, memory.available, fp.dense, fp.kv, fp.ram_tier if on_host else 0, headroom,
                      fp.slot, fp.total_experts, host_short)


def fit_budget(budget: int | str, mp: MemoryPlan, what: str = "the model") -> int:
    """The slots ``budget`` names, checked to fit ``mp``: ``auto`` is the most that fit. Raises BudgetError (one
    line: the arithmetic and what does fit) when nothing fits or an explicit budget is too big."""
    total = mp.total_experts
    if is_auto(budget):
        if mp.slots < 1:
            raise BudgetError(f"expert budget auto: not one expert slot fits ({mp.shortfall(what)})", NOTHING_FITS)
        return mp.slots
    asked = parse_budget(budget, total, mp.slot_nbytes)
    if asked > mp.slots:
        hint = (f"--expert-budget {mp.slots} ({mp.slots / total:.0%}) fits, as does --expert-budget auto"
                if mp.slots else NOTHING_FITS)
        reason = mp.shortfall(what) if mp.host_short else mp.describe()
        raise BudgetError(f"expert budget {budget!r} ({asked} slots, {gib(asked * mp.slot_nbytes)}) "
                          f"does not fit: {reason}", hint)
    return asked
