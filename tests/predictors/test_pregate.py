"""predictors/pregate.py: scores are the next layers' router logits on the normalised current hidden
state, exactly; from_model takes the routers and norms from the model; traces are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import offload
from offload.errors import ConfigError
from offload.model.attention import rms_norm
from predictors import MoEShape, RouteContext
from predictors.pregate import PreGate


def test_scores_are_each_next_layers_router_on_the_normed_state(tiny_dir):
    model = offload.from_pretrained(tiny_dir("qwen3_moe"), device="cpu").model
    moe = model.moe_layers
    shape = MoEShape(len(moe), model.spec.num_experts, model.spec.top_k)
    pre = PreGate.from_model(model, shape, Path("."))
    hidden = torch.randn(4, model.spec.hidden_size)
    path = np.zeros((4, 1, shape.top_k), dtype=np.int64)
    ctx = RouteContext(0, path, np.full((4, shape.num_layers, shape.top_k), -1), hidden)
    scores = pre.predict(ctx, lookahead=2)  # [2, tokens, experts]
    assert scores.shape == (2, 4, shape.num_experts)
    for j in range(2):
        lw = model.layers[moe[1 + j]]
        expected = rms_norm(hidden, lw.post_norm, model.spec.rms_norm_eps) @ lw.router.weight.T
        np.testing.assert_allclose(scores[j], expected.numpy(), rtol=1e-5, atol=1e-5)  # float32 either way


class _Logits:
    """The smallest Router for pregate: scores are plain logits."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


def test_needs_weights_and_hidden_states():
    shape = MoEShape(2, 4, 2)
    with pytest.raises(ConfigError, match="needs the router and norm weights"):
        PreGate(shape)
    pre = PreGate(shape, routers=[_Logits(torch.randn(4, 8))] * 2, norms=[torch.ones(8)] * 2)
    with pytest.raises(ConfigError, match="traces do not hold"):
        pre.predict(RouteContext(0, np.zeros((1, 1, 2), dtype=np.int64), np.full((1, 2, 2), -1)), 1)
    empty = pre.predict(RouteContext(1, np.zeros((1, 2, 2), dtype=np.int64), np.full((1, 2, 2), -1),
                                     torch.randn(1, 8)), 1)
    assert empty.shape == (0, 1, 4)  # the last layer has nothing ahead
