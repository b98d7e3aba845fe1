"""``offload plan``: predicted decode speed of each budget and tier (hw/perfmodel.py) for a checkpoint, with the
misses replayed from a routing trace or assumed uniform, and whether each fits this machine (memory/budget.py)."""

from __future__ import annotations

import torch

from offload.checkpoint.plan import CheckpointPlan
from offload.errors import ConfigError
from offload.hw.machine import gpu_memories
from offload.hw.perfmodel import Fits, MissRate, ModelSizes
from offload.memory.budget import DEFAULT_SEQUENCES, Placement, memory_plan
from offload.sim.simulate import AccessStream, simulate
from offload.traces.format import PHASES, read_trace


def model_sizes(plan: CheckpointPlan, device: str, dtype: torch.dtype | None = None,
                activations: str = "int8") -> ModelSizes:
    """The performance model's view of a validated checkpoint: ``dtype`` is the compute dtype (None: the
    checkpoint's)."""
    spec, fmt = plan.spec, plan.expert_format
    dtype = dtype or spec.checkpoint_dtype
    dense = plan.dense_numel * dtype.itemsize
    embed = spec.vocab_size * spec.hidden_size * dtype.itemsize if not spec.tie_word_embeddings else 0
    slot = fmt.slot_layout(spec, dtype, torch.device(device), activations).nbytes
    return ModelSizes(dense, dense - embed, plan.expert_nbytes(), slot, spec.expert_params, spec.num_layers,
                      spec.num_moe_layers, spec.num_experts, spec.top_k, spec.hidden_size,
                      fmt.compute_key(dtype, activations, device), fmt.host_compute_key(dtype, activations, device),
                      dtype.itemsize, str(dtype).removeprefix("torch."), plan.reads_per_expert())


def trace_miss_rate(path: str, sizes: ModelSizes) -> MissRate:
    """A recorded trace's decode tokens (all its tokens if it has none) through the simulator's global LRU cache.
    The simulator is analysis code: a tool may import it, the runtime never does."""

    trace = read_trace(path)
    h = trace.header
    if (h.num_layers, h.num_experts, h.top_k) != (sizes.num_moe_layers, sizes.num_experts, sizes.top_k):
        raise ConfigError(f"trace {path} was recorded on {h.num_layers} MoE layers x {h.num_experts} experts, "
                          f"top-{h.top_k}; this checkpoint has {sizes.num_moe_layers} x {sizes.num_experts}, "
                          f"top-{sizes.top_k}", "record one on this model with `offload trace`")
    decode = trace.phase == PHASES.index("decode")
    experts = trace.experts[decode] if decode.any() else trace.experts
    if not len(experts):
        raise ConfigError(f"trace {path} holds no tokens", "record one with `offload trace`")
    stream = AccessStream.from_experts(experts, h.num_experts)

    def rate(slots: int) -> tuple[float, float]:
        result = simulate(stream, "lru", "global", slots)
        return result.hit_rate, result.misses_per_token
    return rate


def fits_for(plan: CheckpointPlan, device: str, dtype: torch.dtype, activations: str = "int8",
             context: int = 0, sequences: int = DEFAULT_SEQUENCES) -> Fits:
    """Whether a tier's slots fit this machine, by the fit check that ``--expert-budget auto`` uses (None: planning
    for a GPU this machine does not have, whose free memory is unknown)."""
    def fits(tier: str, slots: int) -> bool | None:
        if device == "cuda" and not gpu_memories() and not torch.cuda.is_available():
            return None
        return slots <= auto_slots(plan, Placement(torch.device(device), dtype, tier, activations, context, sequences))
    return fits


def auto_slots(plan: CheckpointPlan, placement: Placement) -> int:
    """The slots ``--expert-budget auto`` would take for this placement (0: not one fits)."""
    return memory_plan(plan, placement).slots
