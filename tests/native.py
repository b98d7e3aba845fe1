"""Checks shared by the tests of formats whose slots compute from their quantized bytes with int8 activations
(GGUF blocks, gpt-oss's MXFP4): the native model against the exact one (float32 activations, dequantized slots).

Tolerances: every activation is rounded to 1/127 of its block's absmax, ~0.5% of a matmul's output scale (3e-2 as
in tests/offload/experts/kernels, checked for every projection of every layer's first expert, so a slot bound with
another layer's types would fail), which through two layers of the random tiny models leaves the logits within
10% of their scale (2-6% measured); teacher-forced top-1 flips only where it can, where the exact top-2 gap is under
twice that position's largest logit error; and every budget and tier gives the same tokens as 100% does (a
kernel's result does not depend on the slot).
"""

from __future__ import annotations

from pathlib import Path

import torch

import offload
from tests.offload.model.test_forward import _prompts

NEW_TOKENS = 8


def assert_native_close_to_exact(path: Path, native, exact, layers: list[int], **options) -> None:
    """``native`` (int8 activations) against ``exact`` on ``path``'s experts of ``layers`` and on three prompts."""
    inter, hidden = native.spec.expert_intermediate_size, native.spec.hidden_size
    x = torch.randn(2, hidden, generator=torch.Generator().manual_seed(0))
    for key in ((layer, 0) for layer in layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            inputs = x if proj != "down_proj" else x[:, :inter]
            y, ref = getattr(native.cache.acquire(key), proj)(inputs), getattr(exact.cache.acquire(key), proj)(inputs)
            native.cache.release(key)
            exact.cache.release(key)
            assert float((y - ref).abs().max()) < 3e-2 * float(ref.abs().max()), (key, proj)
    ids, mask = _prompts(3)
    real = mask.bool()
    want, got = exact(ids, attention_mask=mask)[real], native(ids, attention_mask=mask)[real]
    error = (got - want).abs().max(-1).values
    assert float(error.max()) < 0.1 * float(want.abs().max())
    top2 = want.topk(2, -1).values
    flips = got.argmax(-1) != want.argmax(-1)
    assert bool((top2[:, 0] - top2[:, 1] < 2 * error)[flips].all()), "a flip where the logits were well apart"
    assert float(flips.float().mean()) <= 0.25
    tokens = native.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=2, pad_token_id=0)
    for budget, tier in ((1, "disk"), ("50%", "ram")):
        model = offload.from_pretrained(path, device="cpu", expert_budget=budget, offload_to=tier, **options)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=2, pad_token_id=0)
        assert torch.equal(out, tokens), (budget, tier)
