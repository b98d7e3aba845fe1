"""MoE routers behind a registry: token hidden states -> top-k experts and their weights.

A family adapter names its router (``Family.router``). Each router declares its tensors (names
relative to the MoE block's prefix), routes tokens, and scores experts for the pre-gating
predictor with the same rule it routes by, so a prediction ranks experts as the layer will.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F

from .config import ModelSpec
from .registry import lookup


class SoftmaxTopK:
    """Softmax over the router logits in float32, top-k, optionally renormalised over the k (norm_topk_prob).

    The weights stay float32 when the family keeps them so (Mixtral), else are cast back to the
    compute dtype, exactly as transformers does for each family.
    """

    name: ClassVar[str] = "softmax-topk"

    @staticmethod
    def tensors(spec: ModelSpec, weight_name: str) -> dict[str, tuple[int, ...]]:
        return {weight_name: (spec.num_experts, spec.hidden_size)}

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], weight_name: str) -> None:
        self.weight = weights[weight_name]  # [experts, hidden]
        self.top_k = spec.top_k
        self.normalize = spec.norm_topk_prob
        self.fp32_weights = spec.router_fp32_weights

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [tokens, hidden] -> experts [tokens, k] (best first), weights [tokens, k]."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.fp32_weights:
            weights = weights.to(logits.dtype)
        return experts, weights


ROUTERS: dict[str, type[SoftmaxTopK]] = {cls.name: cls for cls in (SoftmaxTopK,)}


def router_class(name: str) -> type[SoftmaxTopK]:
    return lookup(ROUTERS, name, "router")
