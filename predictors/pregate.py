"""Speculative pre-gating: the next layers' routers applied to the current hidden state.

Follows Pre-gated MoE (Hwang et al., 2024) and Eliseev & Mazur's speculative expert loading
(2023): the residual stream changes slowly between layers, so layer l+j's router, fed layer l's
hidden state through layer l+j's own norm, already ranks most of the experts l+j will pick.
Needs the model's router and norm weights, so it runs in the runtime only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from offload.errors import ConfigError

from .base import MoEShape, Predictor, RouteContext, register

if TYPE_CHECKING:
    from offload.model.routers import Router


@register
class PreGate(Predictor):
    name = "pregate"
    needs_hidden = True
    across_tokens = False  # the next token's hidden state does not exist yet

    @classmethod
    def from_model(cls, model: Any, shape: MoEShape, checkpoint_dir: Path, **options: Any) -> PreGate:
        """The routers of the model's MoE layers (each scoring by its own selection rule: a bias, sigmoid scores
        with a correction bias and groups) and the norms in front of them (None where the router reads the
        residual stream and normalises it itself, as Gemma-4's)."""
        layers = [model.layers[i] for i in model.moe_layers]
        norms = [None if lw.router.reads_residual else lw.post_norm for lw in layers]
        return cls(shape, routers=[lw.router for lw in layers], norms=norms, eps=model.spec.rms_norm_eps, **options)

    def __init__(self, shape: MoEShape, routers: Sequence[Router] = (), norms: Sequence[torch.Tensor | None] = (),
                 eps: float = 1e-6) -> None:
        super().__init__(shape)
        if len(routers) != shape.num_layers or len(norms) != shape.num_layers:
            raise ConfigError("the pregate predictor needs the router and norm weights of every MoE layer",
                              "use it through the runtime (offload run --predictor pregate)")
        self.routers = list(routers)
        self.norms = [None if n is None else n.float() for n in norms]
        self.eps = eps

    def predict(self, ctx: RouteContext, lookahead: int) -> np.ndarray:
        if ctx.hidden is None:
            raise ConfigError("the pregate predictor needs hidden states, which traces do not hold",
                              "evaluate prev-token, markov or learned on traces")
        first, last = ctx.layer + 1, min(ctx.layer + 1 + lookahead, self.shape.num_layers)
        if first >= last:
            return np.zeros((0, ctx.tokens, self.shape.num_experts), dtype=np.float32)
        raw = ctx.hidden.float()  # [tokens, hidden]
        h = raw * torch.rsqrt(raw.pow(2).mean(-1, keepdim=True) + self.eps)  # the RMSNorm before each router
        return np.stack([self.routers[m].scores(raw if self.norms[m] is None else h * self.norms[m]).numpy(force=True)
                         for m in range(first, last)])
