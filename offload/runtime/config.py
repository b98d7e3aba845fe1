"""How to run a checkpoint: RuntimeConfig, frozen and validated before any file is read.

Every name (policy, predictor, scheduler, hybrid mode, tier) is checked against the registry of the layer that
owns it, which this module imports downward; budgets are parsed by offload/amounts.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from offload.amounts import BUDGET_HINT, Amount, parse_prefetch_budget
from offload.errors import ConfigError, PolicyError
from offload.experts.kernels.linear import QUANT_ACTIVATIONS
from offload.hw.costmodel import check_mode
from offload.memory.policies import POLICIES
from offload.registry import check_name
from offload.runtime.rearrange import SCHEDULERS
from offload.spec import parse_dtype
from predictors import PREDICTORS

OFFLOAD_TIERS = {"disk": "disk", "ram": "ram"}


@dataclass(frozen=True)
class RuntimeConfig:
    """How to run a checkpoint: device and dtype, where experts live, how many fit, what to evict and prefetch,
    and how continuous batching picks its steps. Every name and budget is checked here, before any I/O."""

    device: str = "auto"                  # "auto" (cuda when present), "cpu" or "cuda[:N]"
    dtype: torch.dtype | str | None = None  # compute dtype; None / "auto" = the checkpoint's
    expert_budget: int | str = "100%"     # slots, "25%", bytes ("6GiB"), or "auto" (what fits: memory/budget.py)
    offload_to: str = "disk"              # slow tier: "disk" (the safetensors files) or "ram" (packed host copy)
    policy: str = "lru"                   # policies.POLICIES name
    predictor: str = "none"               # predictors.PREDICTORS name ("none": load on demand only)
    lookahead: int = 1                    # the predictor looks this many MoE layers ahead
    prefetch_budget: int | str = "50%"    # most cache slots prefetched-but-unused experts may hold
    predictor_options: Mapping[str, Any] | None = None  # passed to the predictor (e.g. {"weights": PATH})
    quant_activations: str = "int8"       # integer experts on the CPU: "int8" or "int16" activations in offload's
    #                                       kernels (int16: near exact), or "float32" (dequantize, exact float32 matmul)
    threads: int = 0                      # compute threads (offload's kernel pool and torch's); 0: physical cores
    scheduler: str = "fifo"               # rearrange.SCHEDULERS name, for generate_many / serve
    batch_size: int = 8                   # requests per decode step in continuous batching
    max_wait: int = 4                     # steps a ready request may be skipped by the scheduler
    context: int = 0                      # tokens per sequence the KV cache holds (0: max positions, <= 4096)
    hybrid: str = "off"                   # on CUDA, per missed expert: "off" (fetch), "auto" (cost model), "always"
    #                                       (compute it on the CPU from its host copy); hw/costmodel.py has the formula
    patterns: str | Path | None = None    # task expert patterns (`offload profile`): warm start and priors per request
    task: str | None = None               # with patterns: use this task's pattern instead of matching each prompt
    prune: int | str | None = None        # with patterns: keep this many experts per layer ("4", "50%", "0.5") of the
    #                                       task (--task, else generic) and route among them only (lossy, opt-in)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        activations = str(self.quant_activations).strip().lower().removeprefix("torch.")
        check_name({a: a for a in QUANT_ACTIVATIONS}, activations, "--quant-activations")
        object.__setattr__(self, "quant_activations", activations)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"unknown device {self.device!r}", "use one of: auto, cpu, cuda")
        check_name(OFFLOAD_TIERS, self.offload_to, "--offload-to")
        check_name(POLICIES, self.policy, "eviction policy", PolicyError)
        check_name(PREDICTORS, self.predictor, "predictor", also=("none",))
        check_name(SCHEDULERS, self.scheduler, "scheduler")
        check_mode(self.hybrid)
        for name, least in (("lookahead", 1), ("batch_size", 1), ("max_wait", 0), ("context", 0), ("threads", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"invalid --{name.replace('_', '-')} {value!r}", f"give a whole number >= {least}")
        if str(self.expert_budget).strip().lower() != "auto":
            Amount.parse(self.expert_budget, "expert budget", BUDGET_HINT)
        parse_prefetch_budget(self.prefetch_budget, 1)
        if self.patterns is None and (self.task is not None or self.prune is not None):
            raise ConfigError(f"--{'task' if self.task is not None else 'prune'} needs --patterns",
                              "write a patterns file with `offload profile` and pass it with --patterns")
        if self.prune is not None and self.predictor != "none":
            raise ConfigError(f"--prune keeps every retained expert resident: --predictor {self.predictor} would only "
                              "fetch experts routing can no longer pick", "drop --predictor (or --prune)")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
