"""offload/model/routers.py: softmax top-k routing as each family's transformers code computes it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import offload
from offload.errors import ConfigError
from offload.model.routers import SoftmaxTopK, router_class


@pytest.mark.parametrize("normalize, fp32", [(True, True), (False, False), (True, False)])
def test_softmax_top_k(tiny_dir, normalize, fp32):
    spec = dataclasses.replace(offload.plan_checkpoint(tiny_dir("olmoe")).spec, norm_topk_prob=normalize,
                               router_fp32_weights=fp32)
    weight = torch.randn(spec.num_experts, spec.hidden_size, dtype=torch.bfloat16)
    x = torch.randn(6, spec.hidden_size, dtype=torch.bfloat16)
    experts, weights = SoftmaxTopK(spec, {"weight": weight}).select(x)
    probs = torch.softmax((x @ weight.T).float(), dim=-1)  # the reference: float32 softmax, then top-k
    ref_w, ref_e = torch.topk(probs, spec.top_k, dim=-1)
    if normalize:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert torch.equal(experts, ref_e) and weights.dtype == (torch.float32 if fp32 else torch.bfloat16)
    assert torch.equal(weights, ref_w if fp32 else ref_w.to(torch.bfloat16))


def test_unknown_router():
    with pytest.raises(ConfigError, match="unknown router 'hash'"):
        router_class("hash")
