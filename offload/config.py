"""Frozen configuration objects: what the checkpoint is (ModelSpec) and how to run it (RuntimeConfig)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import BudgetError, ConfigError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}
OFFLOAD_TIERS = ("disk", "ram")
DEVICES = ("auto", "cpu", "cuda")


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None or 'auto' -> None (checkpoint's)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value.lower() == "auto":
        return None
    try:
        return DTYPES[value.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {value!r}", "use one of: auto, float32, bfloat16, float16") from None


@dataclass(frozen=True)
class ModelSpec:
    """Everything the forward pass needs to know about a checkpoint, read from config.json."""

    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    dense_intermediate_size: int          # for layers that are dense MLPs (mlp_only_layers, sparse step)
    shared_expert_intermediate_size: int  # 0 when the family has no shared expert
    moe_layers: tuple[bool, ...]          # per layer: MoE block (True) or dense MLP (False)
    sliding_windows: tuple[int | None, ...]
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    rope_linear_factor: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: str                           # "none" | "head" (Qwen3: per head) | "full" (OLMoE: whole projection)
    checkpoint_dtype: torch.dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def total_experts(self) -> int:
        return self.num_moe_layers * self.num_experts

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.expert_intermediate_size


_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(budget: int | str, total_experts: int, expert_nbytes: int) -> int:
    """Turn an expert budget into a number of cache slots.

    ``budget`` is an int (slots across all layers), a percentage string ("25%" of all experts)
    or a byte size ("6GiB", "64MiB", "500MB"). Byte sizes and slot counts larger than the model
    are clamped to all experts; a percentage over 100% is a mistake and raises.
    """
    text = str(budget).strip().lower().replace(" ", "")
    option = f"expert budget {budget!r}"
    hint = 'give slots (e.g. 16), a percentage ("25%") or a size ("6GiB")'
    if isinstance(budget, bool):
        raise BudgetError(f"invalid {option}", hint)
    if isinstance(budget, int) or re.fullmatch(r"[+-]?\d+", text):
        slots = int(text)
    elif m := re.fullmatch(r"([+-]?\d+(?:\.\d+)?)%", text):
        pct = float(m.group(1))
        if pct > 100:
            raise BudgetError(f"{option} is over 100%", "the cache cannot hold more than every expert")
        if pct <= 0:
            raise BudgetError(f"{option} must be positive", hint)
        slots = math.floor(total_experts * pct / 100 + 1e-9)
        if slots < 1:
            raise BudgetError(f"{option} is less than one expert of {total_experts}", "raise it to at least one slot")
    elif m := re.fullmatch(r"([+-]?\d+(?:\.\d+)?)([kmgt]i?b|b)", text):
        nbytes = float(m.group(1)) * _SIZE_UNITS[m.group(2)]
        if nbytes <= 0:
            raise BudgetError(f"{option} must be positive", hint)
        slots = int(nbytes // expert_nbytes)
        if slots < 1:
            raise BudgetError(f"{option} is smaller than one expert ({expert_nbytes} bytes)", "raise it to at least one expert")
    else:
        raise BudgetError(f"cannot parse {option}", hint)
    if slots <= 0:
        raise BudgetError(f"{option} must be at least 1 slot", hint)
    return min(slots, total_experts)


def parse_prefetch_budget(budget: int | str, num_slots: int) -> int:
    """Turn a prefetch budget (slots, or a percentage of the cache's slots) into slots; 0 is allowed."""
    text = str(budget).strip().replace(" ", "")
    option = f"prefetch budget {budget!r}"
    hint = 'give slots (e.g. 4) or a share of the expert budget ("50%")'
    if isinstance(budget, bool):
        raise BudgetError(f"invalid {option}", hint)
    if isinstance(budget, int) or re.fullmatch(r"\d+", text):
        return min(int(text), num_slots)
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)%", text):
        pct = float(m.group(1))
        if pct > 100:
            raise BudgetError(f"{option} is over 100%", "prefetches cannot hold more than the whole cache")
        return math.floor(num_slots * pct / 100 + 1e-9)
    raise BudgetError(f"cannot parse {option}", hint)


@dataclass(frozen=True)
class RuntimeConfig:
    """How to run a checkpoint: where experts live, how many fit on the device, what to evict."""

    device: str = "auto"                  # "auto" (cuda when present), "cpu" or "cuda[:N]"
    dtype: torch.dtype | None = None      # compute dtype; None = the checkpoint's
    expert_budget: int | str = "100%"     # slots, "25%", or bytes ("6GiB")
    offload_to: str = "disk"              # slow tier: "disk" (the safetensors files) or "ram" (packed host copy)
    policy: str = "lru"                   # eviction policy registry name
    predictor: str = "none"               # predictor registry name ("none": load on demand only)
    lookahead: int = 1                    # the predictor looks this many MoE layers ahead
    prefetch_budget: int | str = "50%"    # most cache slots prefetched-but-unused experts may hold

    def __post_init__(self) -> None:
        if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int) or self.lookahead < 1:
            raise ConfigError(f"invalid --lookahead {self.lookahead!r}", "give a whole number of layers >= 1")
        if self.offload_to not in OFFLOAD_TIERS:
            raise ConfigError(f"unknown --offload-to {self.offload_to!r}", f"use one of: {', '.join(OFFLOAD_TIERS)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"unknown device {self.device!r}", "use one of: auto, cpu, cuda")
