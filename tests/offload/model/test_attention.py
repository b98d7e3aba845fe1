"""offload/model/attention.py: RMSNorm, RoPE and masks against their formulas; the GQA piece declares exactly
the tensors its options need."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import offload
from offload.errors import ConfigError
from offload.model.attention import ATTENTIONS, DECODE_QUERIES, GroupedQueryAttention, attention_masks, rms_norm, sdpa
from offload.model.rope import RotaryEmbedding


def _attention_reference(q, k, v, mask, scale):
    """softmax(q k^T scale, masked) v in float64, GQA by repeating each key/value head for its query heads."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, 1) for t in (k, v))
    scores = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("queries", [1, 3, DECODE_QUERIES, DECODE_QUERIES + 5])
def test_sdpa_matches_float64_attention_in_every_dtype(dtype, queries):
    """A decode step's few half-precision queries run in float32 on the CPU (torch's half kernel is 5-10x slower
    there), longer calls in the dtype itself; either way the output is the float64 attention of the same half
    values, rounded once to the dtype: within 2 units of its last place (2^-7 of the output scale for bf16, 2^-10
    for f16, 1e-5 for float32 sums)."""
    g = torch.Generator().manual_seed(queries)
    keys = 40
    q = torch.randn(2, 8, queries, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, keys, 16, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)[None, None]
    out = sdpa(q, k, v, mask, 0.25, gqa=True)
    ref = _attention_reference(q, k, v, mask, 0.25)
    assert out.dtype == dtype and out.shape == ref.shape
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 1e-5}[dtype]
    assert float((out.double() - ref).abs().max()) <= 2 * ulp * float(ref.abs().max())


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
