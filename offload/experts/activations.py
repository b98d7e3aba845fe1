"""How an expert's projections combine: the activation registry (SwiGLU, gpt-oss's clamped SwiGLU, Gemma's GeGLU).

The family adapter names one; the MoE block and the shared and dense MLPs call it on an Expert.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from offload.experts.layouts import Expert
from offload.registry import lookup

if TYPE_CHECKING:
    from offload.spec import ModelSpec


Activation = Callable[[Expert, torch.Tensor], torch.Tensor]


def swiglu(expert: Expert, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU (Shazeer 2020): down(silu(gate x) * up x). x: [tokens, hidden] -> [tokens, hidden]."""
    gate, up = expert.gate_and_up(x)
    return expert.down_proj(F.silu(gate) * up)


def clamped_swiglu(expert: Expert, x: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss's SwiGLU: gate clamped above and up on both sides at ``limit``, a sigmoid with slope
    ``alpha`` (1.702, the GELU approximation's), up shifted by one: down((up + 1) * gate * sigmoid(alpha * gate))."""
    gate, up = expert.gate_and_up(x)
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return expert.down_proj((up + 1) * (gate * torch.sigmoid(gate * alpha)))


def geglu_tanh(expert: Expert, x: torch.Tensor) -> torch.Tensor:
    """GeGLU, GELU in its tanh approximation (Shazeer 2020; gelu_pytorch_tanh): down(gelu(gate x) * up x)."""
    gate, up = expert.gate_and_up(x)
    return expert.down_proj(F.gelu(gate, approximate="tanh") * up)


ACTIVATIONS: dict[str, Callable[..., torch.Tensor]] = {"swiglu": swiglu, "clamped-swiglu": clamped_swiglu,
                                                       "geglu-tanh": geglu_tanh}


def make_activation(name: str, spec: ModelSpec | None = None) -> Activation:
    """The activation by name, bound to the spec's parameters (clamped-swiglu's limit and alpha)."""
    fn = lookup(ACTIVATIONS, name, "expert activation")
    if fn is clamped_swiglu:
        limit, alpha = (spec.swiglu_limit, spec.swiglu_alpha) if spec else (7.0, 1.702)
        return lambda expert, x: clamped_swiglu(expert, x, limit, alpha)
    return fn
