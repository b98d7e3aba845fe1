"""The CPU branch of a hybrid run (``--hybrid auto|always``): a missed expert the cost model (hw/costmodel.py)
sends to the CPU is computed from the RAM tier's host copy instead of being fetched into a slot."""

from __future__ import annotations

import time

import torch

from offload.checkpoint.plan import CheckpointPlan
from offload.hw.calibration import Calibration
from offload.hw.costmodel import ExpertCostModel, check_mode
from offload.stats import HybridStats


def expert_cost_model(plan: CheckpointPlan, calibration: Calibration, device: str, tier: str, dtype: torch.dtype,
                      activations: str = "int8", cpu_format: str | None = None) -> ExpertCostModel:
    """The cost model of a checkpoint's experts: ``cpu_format`` is the key the host copy computes at on the CPU
    (default: the format's host_compute_key, the layout the RAM tier holds it in for ``device``)."""
    spec, fmt = plan.spec, plan.expert_format
    slot = fmt.slot_layout(spec, dtype, torch.device(device), activations).nbytes
    return ExpertCostModel(calibration, device, tier, spec.expert_params, slot, plan.expert_nbytes(),
                           fmt.compute_key(dtype, activations, device),
                           cpu_format or fmt.host_compute_key(dtype, activations, device), spec.hidden_size,
                           dtype.itemsize, reads=plan.reads_per_expert())


class HostCompute:
    """The CPU branch of a hybrid run: a missed expert the cost model sends to the CPU is computed from the RAM
    tier's host copy (no copy into a slot, nothing over the bus but the tokens' hidden states and the result).

    On a CPU device this is the degenerate case: the host copy is computed in place, which equals the normal
    path's result bit for bit (the same bytes through the same kernels) and saves the slot copy.
    """

    def __init__(self, store, costs: ExpertCostModel, mode: str, stats: HybridStats) -> None:
        self.store, self.costs, self.mode, self.stats = store, costs, check_mode(mode), stats
        self.host_can_compute = getattr(store, "tier", "") == "ram"

    def wants(self, tokens: int, reuse: float = 0.0) -> bool:
        """Whether a miss of ``tokens`` tokens should be computed on the CPU (counts a fetch otherwise)."""
        choice = self.costs.decide(self.mode, tokens, reuse, self.host_can_compute)
        if choice == "fetch":
            self.stats.record("fetch", self.costs.slot_nbytes, tokens)
        return choice == "cpu"

    def run(self, key: tuple[int, int], x: torch.Tensor, activation) -> torch.Tensor:
        """The expert's output for x [tokens, hidden] (on any device), computed on the host copy."""
        start = time.perf_counter()
        buf, layout = self.store.fetch(key, None)
        y = activation(layout.bind(buf), x.to(buf.device)).to(x.device)
        self.stats.record("cpu", self.costs.slot_nbytes, x.shape[0], time.perf_counter() - start)
        return y
