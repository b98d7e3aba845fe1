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


# -- pruning: one mask for every router ---------------------------------------------------------------------------

# one family per router: softmax-topk (three ways), topk-softmax, sigmoid-groups, softmax-groups, sigmoid-bias,
# scaled-softmax
ROUTED = ["mixtral", "olmoe", "qwen3_moe", "gpt_oss", "deepseek_v3", "deepseek_v2", "minimax_m2", "gemma4"]


def make_router(tiny_dir, family: str, seed: int = 0):
    plan = offload.plan_checkpoint(tiny_dir(family))
    cls = router_class(plan.family.router)
    g = torch.Generator().manual_seed(seed)
    weights = {name: torch.randn(shape, generator=g) for name, shape in cls.tensors(plan.spec).items()}
    return cls(plan.spec, weights), plan.spec


@pytest.mark.parametrize("family", ROUTED)
def test_keeping_every_expert_changes_nothing(tiny_dir, family):
    router, spec = make_router(tiny_dir, family)
    x = torch.randn(64, spec.hidden_size)
    experts, weights = router.select(x)
    router.restrict(range(spec.num_experts))
    again, again_w = router.select(x)
    assert torch.equal(experts, again) and torch.equal(weights, again_w)
    assert torch.equal(router.dropped_share(x), torch.zeros(64))


@pytest.mark.parametrize("family", ROUTED)
def test_a_pruned_router_never_picks_a_dropped_expert(tiny_dir, family):
    router, spec = make_router(tiny_dir, family)
    x = torch.randn(256, spec.hidden_size)
    g = torch.Generator().manual_seed(1)
    for keep in range(spec.top_k, spec.num_experts):
        kept = torch.randperm(spec.num_experts, generator=g)[:keep].tolist()
        router.restrict(kept)
        experts, weights = router.select(x)
        assert set(experts.unique().tolist()) <= set(kept), (keep, kept)
        assert (experts.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts per token
        assert torch.isfinite(weights).all()
        share = router.dropped_share(x)
        assert ((share >= 0) & (share <= 1 + 1e-6)).all()
        router.restrict(None)
        free, free_w = router.select(x)  # the oracle of the share: the unrestricted route's weight on dropped ones
        on_dropped = torch.tensor([[e not in kept for e in row] for row in free.tolist()])
        expected = (free_w.float().abs() * on_dropped).sum(-1) / free_w.float().abs().sum(-1)
        torch.testing.assert_close(share, expected)


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "gpt_oss"])
def test_a_pruned_router_routes_as_one_built_on_the_retained_rows(tiny_dir, family):
    """The oracle of "renormalised over the retained": a router whose matrix (and bias) has only their rows."""
    router, spec = make_router(tiny_dir, family)
    kept = [3, 0, 2]  # out of order on purpose; every family here has 4 or more experts and top-2
    small_spec = dataclasses.replace(spec, num_experts=len(kept))
    index = torch.tensor(kept)
    small = type(router)(small_spec, {k: v[index] for k, v in
                                      {"weight": router.weight, "bias": router.bias}.items() if v is not None})
    x = torch.randn(64, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    router.restrict(kept)
    experts, weights = router.select(x)
    small_experts, small_weights = small.select(x)
    assert torch.equal(experts, index[small_experts])
    # one softmax over fewer terms, summed in another order: weights <= 1 differ by a few float32 ulps (2.8e-7 seen)
    torch.testing.assert_close(weights, small_weights, rtol=1e-6, atol=1e-6)
