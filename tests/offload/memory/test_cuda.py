"""The CUDA path end to end: parity with transformers on the same GPU, prefetching on CUDA, the double-buffered
pinned staging of the disk tier, and hybrid execution against fetch-only. All marked gpu: skipped without a
CUDA device (tests/conftest.py); scripts/gpu_check.sh runs them where one is lent.

Tolerances, as on the CPU (tests/offload/test_model.py says why): float32 logits within 1e-4 (both sides use
cuBLAS, TF32 is off for matmuls by torch's default, and the groupings differ: gate and up as two matmuls, our
own SDPA call; a few ulps); bfloat16 within 5e-2 (unit roundoff 2^-8 per operation, a few accumulate over the
layers). Hybrid runs part of the experts on the CPU, whose float32 GEMMs sum in another order than cuBLAS's
(~1e-6), so its logits are held to the same 1e-4 against fetch-only and its tokens must be identical.
"""

from __future__ import annotations

import pytest
import torch

import offload
from tests.conftest import FAMILIES
from tests.offload.model.test_forward import NEW_TOKENS, _min_gap, _prompts

pytestmark = pytest.mark.gpu


def _transformers_on_cuda(path, dtype: torch.dtype, batch: int):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().to("cuda")
    ids, mask = (t.to("cuda") for t in _prompts(batch))
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                           output_scores=True, return_dict_in_generate=True)
        logits = ref(ids, attention_mask=mask).logits
    return out.sequences.cpu(), torch.stack(out.scores, 1).cpu(), logits.cpu()


def _generate(model, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = _prompts(batch)
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=2, pad_token_id=0)
    return tokens.cpu(), model(ids, attention_mask=mask).cpu()


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_on_cuda_matches_transformers_on_cuda(tiny_dir, family):
    path = tiny_dir(family)
    ref_tokens, ref_scores, ref_logits = _transformers_on_cuda(path, torch.float32, 3)
    assert _min_gap(ref_scores, ref_tokens) > 10 * 1e-4, "near-tied logits would make the token check meaningless"
    real = _prompts(3)[1].bool()
    for offload_to in ("disk", "ram"):
        for budget in (1, "25%", "100%"):
            model = offload.from_pretrained(path, device="cuda", expert_budget=budget, offload_to=offload_to)
            tokens, logits = _generate(model, 3)
            assert torch.equal(tokens, ref_tokens), (offload_to, budget)
            torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_bfloat16_on_cuda_matches_transformers_on_cuda(tiny_dir, family):
    path = tiny_dir(family, dtype=torch.bfloat16)
    ref_tokens, _, ref_logits = _transformers_on_cuda(path, torch.bfloat16, 1)
    for offload_to in ("disk", "ram"):
        model = offload.from_pretrained(path, device="cuda", expert_budget="25%", offload_to=offload_to)
        assert model.model.dtype == torch.bfloat16
        tokens, logits = _generate(model, 1)
        assert torch.equal(tokens, ref_tokens), offload_to
        torch.testing.assert_close(logits.float(), ref_logits.float(), atol=5e-2, rtol=0)


@pytest.mark.parametrize("offload_to", ["disk", "ram"])
def test_prefetch_on_cuda_gives_the_same_tokens_as_without(tiny_dir, offload_to):
    path = tiny_dir("mixtral")
    plain = offload.from_pretrained(path, device="cuda", expert_budget="25%", offload_to=offload_to)
    ahead = offload.from_pretrained(path, device="cuda", expert_budget="25%", offload_to=offload_to,
                                    predictor="pregate", lookahead=2)
    assert torch.equal(_generate(ahead, 3)[0], _generate(plain, 3)[0])
    assert ahead.stats.total.prefetch_issued > 0


def test_the_disk_tier_stages_through_two_pinned_buffers_in_turn(tiny_dir):
    path = tiny_dir("mixtral")
    model = offload.from_pretrained(path, device="cuda", expert_budget=1, offload_to="disk")
    mover = model.cache.mover
    assert len(mover._staging) == 2 and all(buf.is_pinned() for buf in mover._staging)
    tokens, _ = _generate(model, 3)
    cpu = offload.from_pretrained(path, device="cpu", expert_budget=1, offload_to="disk")
    assert torch.equal(tokens, _generate(cpu, 3)[0])
    assert all(done is not None for done in mover._staging_done)  # both buffers carried a copy
    assert model.stats.total.misses > 2


@pytest.mark.parametrize("hybrid", ["auto", "always"])
@pytest.mark.parametrize("offload_to", ["ram", "disk"])
def test_hybrid_on_cuda_gives_the_tokens_of_fetch_only(tiny_dir, hybrid, offload_to):
    path = tiny_dir("mixtral")
    fetch = offload.from_pretrained(path, device="cuda", expert_budget="25%", offload_to=offload_to)
    mixed = offload.from_pretrained(path, device="cuda", expert_budget="25%", offload_to=offload_to, hybrid=hybrid)
    (t0, l0), (t1, l1) = _generate(fetch, 3), _generate(mixed, 3)
    real = _prompts(3)[1].bool()
    assert torch.equal(t1, t0)
    torch.testing.assert_close(l1[real], l0[real], atol=1e-4, rtol=0)
