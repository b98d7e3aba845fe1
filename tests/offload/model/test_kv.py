"""offload/model/kv.py: a KV pool row computes what its own KV cache computes; lengths and masks per row."""

from __future__ import annotations

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
