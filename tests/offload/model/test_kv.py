"""offload/model/kv.py: a KV pool row computes what its own KV cache computes; lengths and masks per row."""

from __future__ import annotations

import pytest
import torch

import offload
from offload.model.kv import KVCache, KVPool


def test_kv_pool_rows_match_separate_kv_caches(tiny_dir):
    # Two sequences of different lengths decode in one step of the pool; each row's logits equal
    # those of its own KV cache. Tolerance 1e-5 in float32: only the matmul blocking differs
    # (the pooled step multiplies 2 rows at once, and attends over a longer, masked key range).
    model = offload.from_pretrained(tiny_dir("mixtral"), device="cpu").model
    spec, a, b = model.spec, [5, 17, 33, 60, 8], [9, 8]
    pool = KVPool(spec, 3, 16, torch.float32, torch.device("cpu"))
    separate = []
    for row, prompt in ((2, a), (0, b)):
        ids = torch.tensor([prompt])
        pool.select(torch.tensor([row]))
        model.forward(ids, pool.attention_mask(len(prompt)), torch.arange(len(prompt))[None], pool)
        kv = KVCache(spec, 1, 16, torch.float32, torch.device("cpu"))
        model.forward(ids, torch.ones_like(ids), torch.arange(len(prompt))[None], kv)
        nxt = torch.tensor([[7]])
        separate.append(model.forward(nxt, torch.ones(1, len(prompt) + 1, dtype=torch.long),
                                      torch.tensor([[len(prompt)]]), kv))
    pool.select(torch.tensor([2, 0]))
    pooled = model.forward(torch.tensor([[7], [7]]), pool.attention_mask(1), torch.tensor([[len(a)], [len(b)]]), pool)
    torch.testing.assert_close(pooled[0], separate[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled[1], separate[1][0], atol=1e-5, rtol=0)
    assert pool.lengths.tolist() == [len(b) + 1, 0, len(a) + 1]


def test_pool_rows_keep_their_own_lengths(tiny_dir):
    spec = offload.plan_checkpoint(tiny_dir("mixtral")).spec
    pool = KVPool(spec, 3, 8, torch.float32, torch.device("cpu"))
    k = torch.ones(1, spec.num_kv_heads, 2, spec.head_dim)
    pool.select(torch.tensor([1]))
    keys, _ = pool.update(0, k, 2 * k)
    assert keys.shape == (1, spec.num_kv_heads, 2, spec.head_dim)
    pool.advance(2)
    pool.select(torch.tensor([1, 2]))
    assert pool.attention_mask(1).tolist() == [[1, 1, 1], [1, 0, 0]]  # row 1 has 2 tokens stored, row 2 none
    assert pool.storage_positions(1).tolist() == [[2], [0]]
    assert pool.fresh().tolist() == [False, True] and pool.valid(None, 1).all()
    pool.reset(1)
    assert pool.lengths.tolist() == [0, 0, 0]


def test_cache_stores_a_left_padded_batch_at_one_length(tiny_dir):
    spec = offload.plan_checkpoint(tiny_dir("mixtral")).spec
    kv = KVCache(spec, 2, 8, torch.float32, torch.device("cpu"))
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert kv.valid(mask, 3).tolist() == [[False, True, True], [True, True, True]]
    assert kv.fresh().all() and kv.storage_positions(3).tolist() == [[0, 1, 2]]
    k = torch.zeros(2, spec.num_kv_heads, 3, spec.head_dim)
    keys, values = kv.update(0, k, k)
    kv.advance(3)
    assert keys.shape[2] == 3 and not kv.fresh().any() and kv.storage_positions(1).tolist() == [[3]]


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_next"])
def test_decoding_from_the_state_equals_a_full_forward(tiny_dir, family):
    """Prefill 70 tokens (two chunks of the chunked form), continue with a 3-token step, then decode token by token
    from the conv and recurrent states: every step's logits equal the full forward's over the whole sequence.
    Tolerance 1e-4 in float32: the full forward runs the chunked form over 80 tokens, the steps the one-token
    recurrence; both sum the same products in other orders (observed ~1e-5 on logits of size ~4)."""
    model = offload.from_pretrained(tiny_dir(family), device="cpu").model
    ids = torch.randint(3, 96, (2, 80), generator=torch.Generator().manual_seed(7))
    full = model.forward(ids, torch.ones_like(ids), torch.arange(80)[None])
    kv = KVCache(model.spec, 2, 80, torch.float32, torch.device("cpu"), model.layer_stores)
    steps = [model.forward(ids[:, :70], torch.ones(2, 70, dtype=torch.long), torch.arange(70)[None], kv)]
    steps.append(model.forward(ids[:, 70:73], torch.ones(2, 73, dtype=torch.long), torch.arange(70, 73)[None], kv))
    for t in range(73, 80):
        steps.append(model.forward(ids[:, t : t + 1], torch.ones(2, t + 1, dtype=torch.long), torch.tensor([[t]]), kv))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


def test_pool_state_rows_match_separate_caches_and_reset_to_zero(tiny_dir):
    """Two sequences' Gated DeltaNet states side by side in a pool compute what each computes alone; a reset row's
    state is zero again (a new request must not inherit the last one's history)."""
    model = offload.from_pretrained(tiny_dir("qwen3_next"), device="cpu").model
    spec, stores = model.spec, model.layer_stores
    pool = KVPool(spec, 3, 16, torch.float32, torch.device("cpu"), stores)
    linear = next(i for i in range(spec.num_layers) if spec.layer_type(i) == "linear_attention")
    assert pool.state_nbytes == sum(s.state_nbytes(torch.float32) for s in stores) > 0
    assert pool.k[linear] is None and pool.bytes_per_token == sum(s.token_nbytes(torch.float32) for s in stores)
    separate = []
    for row, prompt in ((2, [5, 17, 33, 60, 8]), (0, [9, 8])):
        pool.select(torch.tensor([row]))
        model.forward(torch.tensor([prompt]), pool.attention_mask(len(prompt)), torch.arange(len(prompt))[None], pool)
        kv = KVCache(spec, 1, 16, torch.float32, torch.device("cpu"), stores)
        model.forward(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
                      torch.arange(len(prompt))[None], kv)
        separate.append(model.forward(torch.tensor([[7]]), torch.ones(1, len(prompt) + 1, dtype=torch.long),
                                      torch.tensor([[len(prompt)]]), kv))
    pool.select(torch.tensor([2, 0]))
    pooled = model.forward(torch.tensor([[7], [7]]), pool.attention_mask(1), torch.tensor([[5], [2]]), pool)
    torch.testing.assert_close(pooled[0], separate[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled[1], separate[1][0], atol=1e-5, rtol=0)
    assert all(t[2].abs().sum() > 0 for t in pool.states[linear])
    pool.reset(2)
    assert all(not t[2].any() for t in pool.states[linear]) and all(t[0].any() for t in pool.states[linear])
