"""Warm start in the simulator: the runtime cache's counts on the same accesses, hand-made windows, and the
per-sequence match on a trace's prefill tokens."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from offload.memory.cache import ExpertCache
from offload.memory.patterns import GENERIC, ModelIdentity, Patterns, TaskPattern, pooled
from offload.memory.policies import make_policy
from offload.sim.simulate import AccessStream, simulate_prefetch
from offload.sim.warmstart import request_misses, warm_starts
from offload.stats import Stats
from offload.traces.format import read_trace
from tests.offload.memory.test_cache import LAYOUT, FakeStore
from tests.paths import DATA


def humaneval_patterns(trace) -> Patterns:
    """HumanEval/0's pattern (the trace's sequence 0), to warm HumanEval/1 with."""
    first = trace.seq == 0
    task = TaskPattern.measure("humaneval", trace.experts[first], trace.weights[first], 8)
    model = ModelIdentity(trace.header.model, "", tuple(range(32)), 8, 2)
    return Patterns(model, {"humaneval": task, GENERIC: pooled([task])})


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu", "layer-lru", "predictive"])
@pytest.mark.parametrize("capacity", [16, 64])
def test_the_runtime_cache_warm_started_counts_what_the_simulator_counts(policy, capacity):
    trace = read_trace(DATA / "mixtral-8x7b-humaneval.jsonl.gz")
    patterns = humaneval_patterns(trace)
    warm, matches = warm_starts(trace, patterns, capacity, task="humaneval")
    assert sorted(warm) == [0, 83] and matches[1].task == "humaneval"  # each sequence's first decode token
    experts = trace.experts[:120].astype(np.int64)  # both sequences' starts: warm starts at tokens 0 and 83
    stats = Stats()
    cache = ExpertCache(FakeStore(), capacity, LAYOUT, torch.device("cpu"), make_policy(policy), stats,
                        layers=range(32))
    for t, token in enumerate(experts):
        if t in warm:
            cache.warm([divmod(k, 8) for k in warm[t]])
        for layer, chosen in enumerate(token):
            for _ in cache.step(layer, sorted(chosen.tolist())):
                pass
    r = simulate_prefetch(AccessStream.from_experts(experts, 8), policy, "global", capacity, pin_steps=True,
                          warm=warm)
    t = stats.total
    assert (t.hits, t.misses, t.evictions, t.warm_loads, t.warm_hits) == (
        r.sim.hits, r.sim.misses, r.sim.evictions, r.warm_loads, r.warm_hits)
    assert capacity < r.warm_loads <= 2 * capacity  # a cold cache filled at token 0; at 83 some are resident
    assert r.token_misses.sum() == r.sim.misses and r.token_misses.shape == (120,)


def test_warm_start_windows_by_hand():
    # One layer, 4 experts, top-1, capacity 2. Sequence 0: prefill e0, decode e1 e2 e1; sequence 1: prefill e3,
    # decode e2 e1. The pattern ranks e1 then e2; a warm start keeps the last prompt token's expert first.
    experts = np.array([0, 1, 2, 1, 3, 2, 1])[:, None, None]
    trace = _trace(experts, seq=[0, 0, 0, 0, 1, 1, 1], phase=[0, 1, 1, 1, 0, 1, 1])
    task = TaskPattern("t", 4, np.array([[0, 0.6, 0.4, 0]]), np.array([[0, 0.6, 0.4, 0]]))
    patterns = Patterns(ModelIdentity("m", "", (0,), 4, 1), {"t": task, GENERIC: task})
    warm, _ = warm_starts(trace, patterns, 2)
    assert warm == {1: [0, 1], 5: [3, 1]}
    cold = simulate_prefetch(AccessStream.from_experts(experts, 4), "lru", "global", 2)
    warmed = simulate_prefetch(AccessStream.from_experts(experts, 4), "lru", "global", 2, warm=warm)
    # cold: e0 e1 e2 miss, e1 hits; e3 misses (evicts e2), e2 misses (evicts e1), e1 misses
    assert cold.token_misses.tolist() == [1, 1, 1, 0, 1, 1, 1]
    # warm: e1 loads into the free slot before token 1 and hits; e2 evicts e0, e1 hits, e3 evicts e2; the second
    # warm start finds e3 and e1 resident; e2 evicts e1, e1 evicts e3
    assert warmed.token_misses.tolist() == [1, 0, 1, 0, 1, 1, 1]
    assert (warmed.warm_loads, warmed.warm_hits) == (1, 1)
    per = request_misses(warmed, trace, first=1)
    assert [(r.seq, r.first_misses, r.decode_misses, r.misses) for r in per] == [(0, 0, 1, 2), (1, 1, 2, 3)]
    assert [(r.first_misses, r.decode_misses) for r in request_misses(cold, trace, first=1)] == [(1, 2), (1, 2)]


def _trace(experts, seq, phase):
    from offload.traces.format import Trace, TraceHeader

    n, layers, k = experts.shape
    return Trace(TraceHeader("m", layers, 4, k), np.array(seq, dtype=np.int32), np.zeros(n, dtype=np.int32),
                 np.array(phase, dtype=np.int8), experts.astype(np.int16), np.ones((n, layers, k), np.float32),
                 np.zeros((n, layers), bool))


def test_the_match_uses_each_sequence_s_prefill():
    experts = np.array([0, 0, 1, 3, 3, 2])[:, None, None]
    trace = _trace(experts, seq=[0, 0, 0, 1, 1, 1], phase=[0, 0, 1, 0, 0, 1])
    low = TaskPattern("low", 10, np.array([[0.5, 0.5, 0, 0]]), np.array([[0.5, 0.5, 0, 0]]))
    high = TaskPattern("high", 10, np.array([[0, 0, 0.5, 0.5]]), np.array([[0, 0, 0.5, 0.5]]))
    patterns = Patterns(ModelIdentity("m", "", (0,), 4, 1), {"low": low, "high": high, GENERIC: pooled([low, high])})
    warm, matches = warm_starts(trace, patterns, 1)
    assert {s: m.task for s, m in matches.items()} == {0: "low", 1: "high"} and warm == {2: [0], 5: [3]}
    assert warm_starts(trace, patterns, 2, scope="per-layer")[0] == {2: [0, 1], 5: [3, 2]}
    single = dataclasses.replace(trace, phase=np.ones(6, dtype=np.int8))  # decode only: matched on nothing
    assert {m.task for m in warm_starts(single, patterns, 1)[1].values()} == {GENERIC}
