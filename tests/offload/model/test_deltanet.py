"""offload/model/deltanet.py: the chunked prefill and the one-token recurrence of the gated delta rule against
the rule written token by token (tests/reference.py), the causal conv continuing from its state, and the
state's float32 whatever the compute dtype.

Tolerances: float32 against a float64 oracle. The chunked form reorders the sums (a triangular solve per chunk
of 64, then a matmul per chunk) and the recurrence multiplies the state by exp(g) each step; over 150 tokens
with unit-size q, k, v the outputs (of size ~1) agree within 1e-5 (observed ~2e-6), well above float32's unit
roundoff (6e-8) times the few hundred operations behind each output.
"""

from __future__ import annotations

import pytest
import torch

import offload
from offload.model.deltanet import causal_conv, chunked_delta_rule, l2_normalize, recurrent_step
from offload.model.kv import KVCache
from tests import reference


def _inputs(b=2, h=3, t=150, dk=8, dv=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (l2_normalize(torch.randn(b, h, t, dk, generator=gen)) for _ in range(2))
    v = torch.randn(b, h, t, dv, generator=gen)
    g = -torch.rand(b, h, t, generator=gen) * 0.5        # decays in (exp(-0.5), 1]: the state remembers ~10 steps
    beta = torch.rand(b, h, t, generator=gen)
    state = torch.randn(b, h, dk, dv, generator=gen)     # continuing a sequence: a nonzero state
    return q * dk**-0.5, k, v, g, beta, state


@pytest.mark.parametrize("t", [1, 63, 64, 150])  # one token, a partial chunk, one whole chunk, three chunks
def test_chunked_prefill_equals_the_rule_token_by_token(t):
    q, k, v, g, beta, state = _inputs(t=t)
    out, final = chunked_delta_rule(q, k, v, g, beta, state)
    ref_out, ref_final = reference.ref_gated_delta_rule(q, k, v, g, beta, state)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(final.double(), ref_final, atol=1e-5, rtol=0)


def test_one_token_recurrence_equals_the_rule():
    q, k, v, g, beta, state = _inputs(t=20)
    ref_out, ref_final = reference.ref_gated_delta_rule(q, k, v, g, beta, state)
    outs = []
    for i in range(20):
        out, state = recurrent_step(q[:, :, i], k[:, :, i], v[:, :, i], g[..., i], beta[..., i], state)
        outs.append(out)
    torch.testing.assert_close(torch.stack(outs, 2).double(), ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.double(), ref_final, atol=1e-5, rtol=0)


def test_conv_continues_from_its_state():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 11, 5, generator=gen), torch.randn(5, 1, 4, generator=gen)
    whole, _ = causal_conv(x, torch.zeros(2, 5, 3), w)
    torch.testing.assert_close(whole.double(), reference.ref_causal_conv(x, w), atol=1e-6, rtol=0)
    state, parts = torch.zeros(2, 5, 3), []
    for piece in x.split([2, 1, 5, 1, 2], dim=1):  # pieces shorter than the kernel too
        out, state = causal_conv(piece, state, w)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(state, x[:, -3:].transpose(1, 2))  # the last kernel - 1 inputs


def test_state_stays_float32_in_a_bfloat16_model(tiny_dir):
    model = offload.from_pretrained(tiny_dir("qwen3_5_moe"), device="cpu", dtype=torch.bfloat16).model
    linear = [i for i in range(model.spec.num_layers) if model.spec.layer_type(i) == "linear_attention"]
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    kv = KVCache(model.spec, 1, 16, model.dtype, model.device, model.layer_stores)
    model.forward(ids, torch.ones_like(ids), torch.arange(9)[None], kv)
    for i in linear:
        conv, state = kv.state(i)
        assert conv.dtype == torch.bfloat16 and state.dtype == torch.float32 and state.abs().sum() > 0
        assert kv.k[i] is None  # a linear-attention layer keeps no keys or values


def test_padding_never_enters_the_state(tiny_dir):
    """A left-padded row's state equals that of the same tokens alone: padded positions write nothing."""
    model = offload.from_pretrained(tiny_dir("qwen3_next"), device="cpu").model
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    kv_alone, kv_padded = (KVCache(model.spec, 1, 16, model.dtype, model.device, model.layer_stores)
                           for _ in range(2))
    model.forward(ids, torch.ones_like(ids), torch.arange(6)[None], kv_alone)
    model.forward(padded, mask, (mask.cumsum(-1) - 1).clamp_min(0), kv_padded)
    for i in range(model.spec.num_layers):
        for alone, pad in zip(kv_alone.state(i), kv_padded.state(i)):
            torch.testing.assert_close(pad, alone, atol=1e-5, rtol=0)
