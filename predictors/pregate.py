"""Speculative pre-gating: the next layers' routers applied to the current hidden state.

Follows Pre-gated MoE (Hwang et al., 2024) and Eliseev & Mazur's speculative expert loading
(2023): the residual stream changes slowly between layers, so layer l+j's router, fed layer l's
hidden state through layer l+j's own norm, already ranks most of the experts l+j will pick.
Needs the model's router and norm weights, so it runs in the runtime only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offload.errors import ConfigError

from .base import MoEShape, Predictor, RouteContext, register


@register
class PreGate(Predictor):
    name = "pregate"
    needs_hidden = True
    across_tokens = False  # the next token's hidden state does not exist yet

    @classmethod
    def from_model(cls, model: Any, shape: MoEShape, checkpoint_dir: Path, **options: Any) -> PreGate:
        """The routers of the model's MoE layers, the norms in front of them, and each router's own selection
        rule (a bias, sigmoid scores with a correction bias and groups) applied to the logits."""
        layers = [model.layers[i] for i in model.moe_layers]
        return cls(shape, routers=[lw.router.weight for lw in layers], norms=[lw.post_norm for lw in layers],
                   eps=model.spec.rms_norm_eps, rules=[lw.router.selection_scores for lw in layers], **options)

    def __init__(self, shape: MoEShape, routers: Sequence[torch.Tensor] = (), norms: Sequence[torch.Tensor] = (),
                 eps: float = 1e-6, rules: Sequence[Callable[[np.ndarray], np.ndarray]] | None = None) -> None:
        super().__init__(shape)
        if len(routers) != shape.num_layers or len(norms) != shape.num_layers:
            raise ConfigError("the pregate predictor needs the router and norm weights of every MoE layer",
                              "use it through the runtime (offload run --predictor pregate)")
        # Fold each layer's norm weight into its router: router(norm(h)) = (router * w) @ rms(h),
        # so one matmul scores every layer ahead. Rows [l * E, (l + 1) * E) are layer l's experts.
        # Held as float32 numpy: for one decode token, torch's per-op dispatch costs more than the math.
        self.weight = torch.cat([r.float() * n.float()[None, :] for r, n in zip(routers, norms)]).numpy(force=True)
        self.eps = eps
        self.rules = list(rules) if rules is not None else None  # None: logits rank as the router does (softmax)

    def predict(self, ctx: RouteContext, lookahead: int) -> np.ndarray:
        if ctx.hidden is None:
            raise ConfigError("the pregate predictor needs hidden states, which traces do not hold",
                              "evaluate prev-token, markov or learned on traces")
        E = self.shape.num_experts
        first, last = ctx.layer + 1, min(ctx.layer + 1 + lookahead, self.shape.num_layers)
        if first >= last:
            return np.zeros((0, ctx.tokens, E), dtype=np.float32)
        h = ctx.hidden.float().numpy(force=True)  # [tokens, hidden]
        h = h / np.sqrt(np.mean(np.square(h), axis=-1, keepdims=True) + self.eps)  # the RMSNorm before each router
        logits = (h @ self.weight[first * E : last * E].T).reshape(ctx.tokens, last - first, E).transpose(1, 0, 2)
        if self.rules is None:
            return logits  # [d, tokens, E]
        return np.stack([self.rules[first + j](logits[j]) for j in range(last - first)])
