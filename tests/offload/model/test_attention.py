"""offload/model/attention.py: RMSNorm, RoPE and masks against their formulas; the GQA piece declares exactly
the tensors its options need."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import offload
from offload.errors import ConfigError
from offload.model.attention import ATTENTIONS, GroupedQueryAttention, attention_masks, rms_norm
from offload.model.rope import RotaryEmbedding


def test_rms_norm_formula():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 16, dtype=torch.float64, generator=gen), torch.randn(16, dtype=torch.float64, generator=gen)
    expected = w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    # normalised in float32 as the references do, so float32's tolerance even for float64 input
    torch.testing.assert_close(rms_norm(x, w, 1e-6), expected, rtol=1.3e-6, atol=1e-5)


def test_rope_rotates_pairs_by_position_times_frequency(tiny_dir):
    spec = offload.plan_checkpoint(tiny_dir("mixtral")).spec
    cos, sin = RotaryEmbedding(spec.rope, spec.head_dim, torch.float64, torch.device("cpu"))(torch.tensor([[0, 3]]))
    d = spec.head_dim
    freq = spec.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(cos[0, 0, 1, : d // 2], torch.cos(3 * freq))
    torch.testing.assert_close(sin[0, 0, 0], torch.zeros(d, dtype=torch.float64))
    linear = dataclasses.replace(spec.rope, kind="linear", factor=2.0)
    scaled = RotaryEmbedding(linear, spec.head_dim, torch.float64, torch.device("cpu"))
    torch.testing.assert_close(scaled(torch.tensor([[6]]))[0], cos[:, :, 1:])  # position 6 / 2 = 3


def test_masks_are_causal_padded_and_windowed():
    mask = torch.tensor([[0, 1, 1, 1, 1]])  # one pad on the left
    masks = attention_masks(mask, torch.arange(5)[None], {None, 2})
    full, window = masks[None][0, 0], masks[2][0, 0]
    assert full[4].tolist() == [False, True, True, True, True]
    assert window[4].tolist() == [False, False, False, True, True]  # itself and one before
    assert full[0].tolist() == [True, False, False, False, False]  # a pad row still sees itself (no NaN)


def test_gqa_declares_the_tensors_its_options_need(tiny_dir):
    spec = offload.plan_checkpoint(tiny_dir("qwen3_moe")).spec
    names = GroupedQueryAttention.tensors(spec)
    assert {"q_norm.weight", "k_norm.weight"} <= names.keys() and "q_proj.bias" not in names
    assert names["q_norm.weight"] == (spec.head_dim,)
    full = GroupedQueryAttention.tensors(dataclasses.replace(spec, qk_norm="full", qkv_bias=True, o_bias=True))
    assert full["k_norm.weight"] == (spec.num_kv_heads * spec.head_dim,) and "o_proj.bias" in full
    assert ATTENTIONS["gqa"] is GroupedQueryAttention
    from offload.model.attention import attention_class

    with pytest.raises(ConfigError, match="unknown attention 'linear'"):
        attention_class("linear")
