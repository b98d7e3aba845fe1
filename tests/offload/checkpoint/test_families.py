"""Released checkpoints' config.json files, unscaled (tests/data/configs, from the hub): every field
spelling they use is read, and the sizes offload plans with are the real ones."""

from __future__ import annotations

import json

import pytest
import torch

from offload.amounts import parse_budget
from offload.checkpoint.families import family_for_config
from tests.paths import DATA

CONFIGS = DATA / "configs"

# file: family, layers, MoE layers, experts, top-k, hidden, expert intermediate, head_dim, kv heads,
#       shared expert intermediate, renormalised top-k, qkv bias, rope theta
EXPECTED = {
    "mixtral-8x7b": ("mixtral", 32, 32, 8, 2, 4096, 14336, 128, 8, 0, True, False, 1e6),
    "olmoe-1b-7b": ("olmoe", 16, 16, 64, 8, 2048, 1024, 128, 16, 0, False, False, 1e4),
    "qwen2-moe-57b-a14b": ("qwen2_moe", 28, 28, 64, 8, 3584, 2560, 128, 4, 20480, False, True, 1e6),
    "qwen3-moe-30b-a3b": ("qwen3_moe", 48, 48, 128, 8, 2048, 768, 128, 4, 0, True, False, 1e6),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_configs_give_the_real_shapes(name):
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    spec = family_for_config(cfg).spec_from_config(cfg, torch.bfloat16)
    got = (spec.family, spec.num_layers, sum(spec.moe_layers), spec.num_experts, spec.top_k, spec.hidden_size,
           spec.expert_intermediate_size, spec.head_dim, spec.num_kv_heads, spec.shared_expert_intermediate_size,
           spec.norm_topk_prob, spec.qkv_bias, spec.rope_theta)
    assert got == EXPECTED[name]
    assert spec.expert_params == 3 * spec.hidden_size * spec.expert_intermediate_size
    assert spec.total_experts == spec.num_experts * sum(spec.moe_layers)


def test_budgets_at_real_scale():
    # One Mixtral-8x7B expert is 3 x 4096 x 14336 bf16 parameters = 352,321,536 bytes: 12 GiB holds 36
    # of the 256; 25% is 64 slots; a size beyond the model is clamped to every expert.
    cfg = json.loads((CONFIGS / "mixtral-8x7b.json").read_text())
    spec = family_for_config(cfg).spec_from_config(cfg, torch.bfloat16)
    nbytes = spec.expert_params * 2
    assert nbytes == 352_321_536
    assert parse_budget("12GiB", spec.total_experts, nbytes) == 36
    assert parse_budget("25%", spec.total_experts, nbytes) == 64
    assert parse_budget("1TB", spec.total_experts, nbytes) == 256
