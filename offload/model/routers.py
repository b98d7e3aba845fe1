"""MoE routers behind a registry and one protocol: token hidden states -> top-k experts and their weights.

A family adapter names its router (``Family.router``). Each router declares its tensors (names
relative to the router module, e.g. ``mlp.gate.``), routes tokens exactly as the family's
transformers code does (``select``), and scores every expert by its own selection rule (``scores``),
so that the pre-gating predictor and batching's admission guess pick what the layer would pick
without reaching into any router's weights.

Pruning (``--prune``, PreMoe's retained experts) is one mechanism for every router: ``restrict`` marks the
dropped experts, and each router sets their selection scores to -inf (0 after a softmax) where it ranks its
experts, so the top-k comes from the retained experts only and the router's own weighting (a softmax over the
retained, a renormalisation over the k) applies to them, as if its matrix had only the retained rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Protocol

import torch

from offload.experts.kernels.linear import float_linear
from offload.registry import lookup
from offload.spec import ModelSpec


class Router(Protocol):
    """What the MoE block, the pre-gating predictor, batching and pruning need of a router."""

    dropped: torch.Tensor | None  # [experts] bool: the experts pruning took out of its choice (None: none)

    reads_residual: bool  # scores the residual stream, which it normalises itself (Gemma-4), not the MoE input

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [tokens, hidden] -> experts [tokens, k] (best first), routing weights [tokens, k]."""
        ...

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, hidden] -> float32 [tokens, experts] whose order within a row is the routing's choice."""
        ...

    def restrict(self, experts: Sequence[int] | None) -> None:
        """Route among ``experts`` only from now on (None: all)."""
        ...

    def dropped_share(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, hidden] -> [tokens]: the share of the unrestricted routing weight on dropped experts."""
        ...


class SoftmaxTopK:
    """Softmax over the router logits in float32, top-k, optionally renormalised over the k (norm_topk_prob).

    The weights stay float32 when the family keeps them so (Mixtral), else are cast back to the
    compute dtype, exactly as transformers does for each family.
    """

    name: ClassVar[str] = "softmax-topk"
    reads_residual: ClassVar[bool] = False

    @staticmethod
    def tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        return {"weight": (spec.num_experts, spec.hidden_size)}

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> None:
        self.weight = weights["weight"]  # [experts, hidden]
        self.bias = weights.get("bias")
        self.top_k = spec.top_k
        self.normalize = spec.norm_topk_prob
        self.fp32_weights = spec.router_fp32_weights
        self.dropped: torch.Tensor | None = None  # [experts] bool: True where pruning dropped it; None: all kept

    def restrict(self, experts: Sequence[int] | None) -> None:
        """Route among ``experts`` only (None: all again); at least top_k of them, or a token could not pick k."""
        if experts is None:
            self.dropped = None
            return
        keep = sorted({int(e) for e in experts})
        if len(keep) < self.top_k or keep[0] < 0 or keep[-1] >= self.weight.shape[0]:
            raise ValueError(f"restrict needs {self.top_k}..{self.weight.shape[0]} expert ids in range, got {keep}")
        dropped = torch.ones(self.weight.shape[0], dtype=torch.bool, device=self.weight.device)
        dropped[keep] = False
        self.dropped = dropped

    def _masked(self, scores: torch.Tensor, fill: float = float("-inf")) -> torch.Tensor:
        """Selection scores [tokens, experts] with the dropped experts at ``fill`` (any dtype; unchanged if none)."""
        return scores if self.dropped is None else scores.masked_fill(self.dropped, fill)

    def _retained_topk(self, choice: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Top-k of a group-limited ``choice``; a token whose best groups hold fewer than k retained experts takes
        the top-k of every retained expert's ``scores`` instead, so a dropped expert is never picked."""
        experts = torch.topk(choice, self.top_k, dim=-1).indices
        if self.dropped is not None:
            short = self.dropped[experts].any(-1)
            if bool(short.any()):
                experts[short] = torch.topk(self._masked(scores[short]), self.top_k, dim=-1).indices
        return experts

    def dropped_share(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens]: the share of each token's unrestricted top-k weight that falls on dropped experts, i.e. the
        routing mass pruning takes away (zeros without a restriction)."""
        if self.dropped is None:
            return torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        dropped, self.dropped = self.dropped, None
        try:
            experts, weights = self.select(x)
        finally:
            self.dropped = dropped
        weights = weights.float().abs()  # (Gemma-4's per-expert scales could make a weight negative)
        return (weights * dropped[experts]).sum(-1) / weights.sum(-1).clamp_min(1e-30)

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [tokens, hidden] -> experts [tokens, k] (best first), weights [tokens, k]."""
        logits = float_linear(x, self.weight)
        probs = torch.softmax(self._masked(logits.float()), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.fp32_weights:
            weights = weights.to(logits.dtype)
        return experts, weights

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 router logits [tokens, experts] (with the router's bias, if it has one)."""
        bias = None if self.bias is None else self.bias.float()
        return float_linear(x.float(), self.weight, bias)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The logits (dropped experts at -inf): softmax keeps their order."""
        return self._masked(self.logits(x))


class TopKSoftmax(SoftmaxTopK):
    """gpt-oss: logits with a bias, the top-k of them, then a softmax over the k selected (compute dtype)."""

    name: ClassVar[str] = "topk-softmax"

    @staticmethod
    def tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        return {"weight": (spec.num_experts, spec.hidden_size), "bias": (spec.num_experts,)}

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, experts = torch.topk(self._masked(float_linear(x, self.weight, self.bias)), self.top_k, dim=-1)
        return experts, torch.softmax(top, dim=-1, dtype=top.dtype)


class SigmoidGroups(SoftmaxTopK):
    """DeepSeek-V3 / GLM-4.5 ("noaux_tc"): sigmoid scores in float32; the correction bias is added for the
    choice only; experts are picked from the ``topk_group`` groups (of ``n_group``) whose top-2 biased
    scores sum highest; weights are the unbiased scores, renormalised (norm_topk_prob) and scaled by
    ``routed_scaling_factor``."""

    name: ClassVar[str] = "sigmoid-groups"

    @staticmethod
    def tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        return {"weight": (spec.num_experts, spec.hidden_size), "e_score_correction_bias": (spec.num_experts,)}

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__(spec, weights)
        self.bias = weights["e_score_correction_bias"].float()
        self.groups, self.topk_group, self.scale = spec.n_group, spec.topk_group, spec.routed_scaling_factor

    def _choice(self, scores: torch.Tensor) -> torch.Tensor:
        """Biased scores with the experts outside the best groups (and dropped ones) at -inf. scores: [tokens,
        experts] float32."""
        choice = self._masked(scores + self.bias)
        if self.groups == 1:
            return choice
        per_group = choice.view(len(choice), self.groups, -1)
        # groups ranked by their retained experts: a dropped one counts as a large finite loss, not -inf, so a
        # group with one retained expert still outranks a group with none
        ranked = self._masked(scores + self.bias, -1e30).view_as(per_group)
        group_scores = ranked.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(-1)  # [tokens, groups]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
        return per_group.masked_fill(~keep[..., None], float("-inf")).view_as(choice)

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(float_linear(x.float(), self.weight))
        experts = self._retained_topk(self._choice(scores), scores + self.bias)
        weights = scores.gather(1, experts)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return experts, weights * self.scale

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The biased sigmoid scores, experts outside the chosen groups (and dropped ones) at -inf."""
        return self._choice(torch.sigmoid(float_linear(x.float(), self.weight)))


class SigmoidBias(SigmoidGroups):
    """MiniMax-M2: DeepSeek-V3's rule with one group and no scale (sigmoid scores, a selection-only correction
    bias, weights the unbiased scores renormalised), its bias held by the MoE block beside the ``gate``."""

    name: ClassVar[str] = "sigmoid-bias"

    @staticmethod
    def tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        return {"gate.weight": (spec.num_experts, spec.hidden_size), "e_score_correction_bias": (spec.num_experts,)}

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__(spec, {"weight": weights["gate.weight"],
                                "e_score_correction_bias": weights["e_score_correction_bias"]})


class ScaledSoftmax(SoftmaxTopK):
    """Gemma-4: the router normalises the residual stream itself (RMSNorm without a weight), scales it by a learned
    vector and 1 / sqrt(hidden), then softmax, top-k renormalised, and each chosen expert's weight times a learned
    per-expert scale (after the choice, so the scale never changes which experts run)."""

    name: ClassVar[str] = "scaled-softmax"
    reads_residual: ClassVar[bool] = True

    @staticmethod
    def tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        e, h = spec.num_experts, spec.hidden_size
        return {"proj.weight": (e, h), "scale": (h,), "per_expert_scale": (e,)}

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__(spec, {"weight": weights["proj.weight"]})
        self.scale, self.per_expert_scale = weights["scale"], weights["per_expert_scale"]
        self.eps, self.root = spec.rms_norm_eps, spec.hidden_size**-0.5

    def _input(self, h: torch.Tensor) -> torch.Tensor:
        h32 = h.float()
        return (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.eps)).to(h.dtype) * self.scale * self.root

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self._masked(float_linear(self._input(x), self.weight).float()), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights * self.per_expert_scale[experts]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self._masked(float_linear(self._input(x).float(), self.weight))


class SoftmaxGroups(SoftmaxTopK):
    """DeepSeek-V2: softmax over all experts in float32, top-k (greedy; "group_limited_greedy" first keeps the
    ``topk_group`` groups with the highest single score), weights times ``routed_scaling_factor``, no
    renormalisation (transformers' DeepSeek-V2 never renormalises)."""

    name: ClassVar[str] = "softmax-groups"

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__(spec, weights)
        self.groups, self.topk_group, self.scale = spec.n_group, spec.topk_group, spec.routed_scaling_factor

    def _choice(self, scores: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return scores
        per_group = scores.view(len(scores), self.groups, -1)  # dropped experts are at 0, as the softmax made them
        keep = torch.zeros(per_group.shape[:2], dtype=torch.bool, device=scores.device)
        keep.scatter_(1, per_group.amax(-1).topk(self.topk_group, dim=-1).indices, True)
        return per_group.masked_fill(~keep[..., None], 0.0).view_as(scores)

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.softmax(self._masked(float_linear(x.float(), self.weight)), dim=-1)
        experts = self._retained_topk(self._choice(scores), scores)
        return experts, scores.gather(1, experts) * self.scale

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax, experts outside the chosen groups (and dropped ones) at 0."""
        return self._choice(torch.softmax(self._masked(float_linear(x.float(), self.weight)), dim=-1))


ROUTERS: dict[str, type[SoftmaxTopK]] = {cls.name: cls for cls in (SoftmaxTopK, TopKSoftmax, SigmoidGroups,
                                                                    SigmoidBias, ScaledSoftmax, SoftmaxGroups)}


def router_class(name: str) -> type[SoftmaxTopK]:
    return lookup(ROUTERS, name, "router")
