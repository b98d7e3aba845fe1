"""generate(): stopping, sampling, streaming, and outputs that never depend on budget or policy."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import offload
from offload.runtime.generate import TextStreamer
from tests.tiny_models import add_char_tokenizer

PROMPT = torch.tensor([[5, 17, 33, 60, 8]])


@pytest.fixture(scope="module")
def qwen2(tiny_dir):
    return offload.from_pretrained(tiny_dir("qwen2_moe"), device="cpu")


def test_returns_prompt_plus_new_tokens(qwen2):
    out = qwen2.generate(PROMPT, max_new_tokens=6, eos_token_id=None)
    assert out.shape == (1, 11) and out.dtype == torch.long and torch.equal(out[:, :5], PROMPT)
    assert torch.equal(qwen2.generate(PROMPT, max_new_tokens=0), PROMPT)


def test_stops_at_eos_and_pads_finished_rows(qwen2):
    free = qwen2.generate(PROMPT, max_new_tokens=6, eos_token_id=None)
    stop = int(free[0, 7])  # pretend the third new token is EOS
    out = qwen2.generate(PROMPT, max_new_tokens=6, eos_token_id=stop)
    assert torch.equal(out, free[:, :8])
    batch = torch.cat([PROMPT, torch.tensor([[9, 9, 9, 9, 9]])])
    both = qwen2.generate(batch, max_new_tokens=6, eos_token_id=stop, pad_token_id=0)
    row = both[0, 5:].tolist()
    assert row[:3] == free[0, 5:8].tolist() and set(row[3:]) <= {0}  # padded after its EOS


def test_seeded_sampling(qwen2):
    sample = lambda seed: qwen2.generate(PROMPT, max_new_tokens=8, do_sample=True, temperature=1.3, top_k=20,  # noqa: E731
                                         top_p=0.9, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sample(3), sample(3))
    assert any(not torch.equal(sample(3), sample(s)) for s in range(4, 8))


def test_top_k_one_is_greedy(qwen2):
    greedy = qwen2.generate(PROMPT, max_new_tokens=6, eos_token_id=None)
    sampled = qwen2.generate(PROMPT, max_new_tokens=6, eos_token_id=None, do_sample=True, top_k=1,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, sampled)


def test_text_streamer_matches_generate_text(tiny_dir, tmp_path):
    import shutil

    path = add_char_tokenizer(shutil.copytree(tiny_dir("olmoe"), tmp_path / "m"))
    model = offload.from_pretrained(path, device="cpu")
    out = io.StringIO()
    ids = model.encode("hello")
    model.generate(ids, max_new_tokens=10, streamer=TextStreamer(model.tokenizer, out=out))
    assert out.getvalue() == model.generate_text("hello", max_new_tokens=10) + "\n"


@pytest.fixture(scope="module")
def olmoe_reference(tiny_dir):
    path = tiny_dir("olmoe")
    return path, offload.from_pretrained(path, device="cpu").generate(PROMPT, max_new_tokens=10)


@settings(max_examples=12, deadline=None)
@given(budget=st.integers(1, 24), policy=st.sampled_from(["lru", "lfu", "fifo"]),
       offload_to=st.sampled_from(["disk", "ram"]))
def test_tokens_do_not_depend_on_budget_or_policy(olmoe_reference, budget, policy, offload_to):
    path, expected = olmoe_reference
    model = offload.from_pretrained(path, device="cpu", expert_budget=budget, policy=policy, offload_to=offload_to)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=10), expected)


def test_resident_expert_memory_stays_within_a_byte_budget(tiny_dir):
    path = tiny_dir("mixtral")
    budget = 40 * 1024
    model = offload.from_pretrained(path, device="cpu", expert_budget=f"{budget}B")
    assert 1 <= model.cache.num_slots and model.cache.resident_nbytes <= budget
    model.generate(PROMPT, max_new_tokens=8)
    assert model.cache.resident_nbytes <= budget and len(model.cache.resident) <= model.cache.num_slots
    assert model.stats.total.evictions > 0  # the budget really was binding
