"""Prefetching: exact prefetch accounting in the cache, asynchronous loads and stalls, prediction
counts, and output tokens that never depend on the predictor, lookahead or prefetch budget."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import offload
from offload.amounts import parse_prefetch_budget
from offload.errors import BudgetError, ConfigError
from offload.memory.cache import ExpertCache
from offload.memory.policies import make_policy
from offload.stats import Stats
from predictors import PREDICTORS, MoEShape, Predictor, RouteContext
from tests.offload.memory.test_cache import LAYOUT, FakeStore, run
from tests.paths import DATA

PROMPT = torch.tensor([[5, 17, 33, 60, 8]])


class GatedStore(FakeStore):
    """A FakeStore whose fetches wait until the test opens the gate: loads are in flight on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.started = threading.Event()  # a load is running (blocked at the gate)

    def fetch(self, key, scratch):
        self.started.set()
        assert self.gate.wait(10), "the test never opened the gate"
        return super().fetch(key, scratch)


def make_cache(slots: int, store=None, async_loads: bool = False) -> tuple[ExpertCache, FakeStore, Stats]:
    store, stats = store or FakeStore(), Stats()
    cache = ExpertCache(store, slots, LAYOUT, torch.device("cpu"), make_policy("lru"), stats, async_loads=async_loads)
    return cache, store, stats


@pytest.mark.parametrize("async_loads", [False, True])
def test_prefetch_counts_on_a_hand_made_sequence(async_loads):
    # 3 slots, one layer. a b resident; prefetch c (free slot), then d (evicts LRU a); demand c (used),
    # b (hit), then a (miss: evicts d, a prefetch never used -> wasted).
    cache, store, stats = make_cache(3, async_loads=async_loads)
    run(cache, [(0, 0), (0, 1)])
    assert cache.prefetch((0, 2)) and cache.prefetch((0, 3))
    assert not cache.prefetch((0, 3))  # already resident: nothing to do
    assert cache.resident == {(0, 1), (0, 2), (0, 3)}
    # Let the loader finish d: a prefetch still queued when it is evicted is cancelled, not loaded (by design),
    # and whether d's load has started by then is a race between the two threads.
    cache.drain()
    run(cache, [(0, 2), (0, 1), (0, 0)])
    t = stats.total
    assert (t.prefetch_issued, t.prefetch_used, t.prefetch_wasted) == (2, 1, 1)
    assert (t.hits, t.misses, t.evictions) == (2, 3, 2)
    assert len(store.fetches) == 5  # every miss and every prefetch is exactly one load
    cache.close()


def test_prefetch_never_evicts_pinned_or_protected_experts():
    cache, _, _ = make_cache(2)
    cache.acquire((0, 0))                                # pinned: in use by the current layer
    run(cache, [(0, 1)])                                 # resident, unpinned
    assert not cache.prefetch((0, 2), protect={(0, 1)})  # the only evictable one is protected
    assert cache.resident == {(0, 0), (0, 1)}
    assert cache.prefetch((0, 2))                        # unprotected: (0, 1) goes
    assert cache.resident == {(0, 0), (0, 2)}


def test_demand_on_an_in_flight_prefetch_waits_for_it_once():
    store = GatedStore()
    cache, _, stats = make_cache(2, store=store, async_loads=True)
    assert cache.prefetch((0, 0))
    assert cache.prefetch((0, 1))
    cache.reserve((0, 0))
    threading.Timer(0.05, store.gate.set).start()
    gate = cache.wait((0, 0)).gate_proj.weight                    # blocks until the gate opens: a stall
    assert float(gate[0, 0]) == 0.0
    cache.release((0, 0))
    t = stats.total
    assert (t.hits, t.misses, t.stalls, t.prefetch_used) == (1, 0, 1, 1)
    assert t.stall_time_s > 0
    assert store.fetches.count((0, 0)) == 1             # waited for the prefetch, did not load again
    cache.drain()
    run(cache, [(0, 1)])                                 # loaded by now: a hit and no stall
    assert (stats.total.hits, stats.total.stalls) == (2, 1)
    cache.close()


def test_evicting_an_in_flight_prefetch_waits_for_its_load():
    store = GatedStore()
    cache, _, stats = make_cache(1, store=store, async_loads=True)
    assert cache.prefetch((0, 0))
    assert store.started.wait(10)  # its load is running: too late to cancel
    threading.Timer(0.05, store.gate.set).start()
    assert cache.prefetch((0, 1))  # evicts (0, 0) as soon as its bytes have landed
    cache.drain()
    assert cache.resident == {(0, 1)} and store.fetches == [(0, 0), (0, 1)]
    assert (stats.total.prefetch_wasted, stats.total.evictions) == (1, 1)
    cache.close()


def test_evicting_a_queued_prefetch_cancels_its_load():
    # (0,0)'s load runs (blocked at the gate), (1,1)'s waits behind it. Layer 1 routes elsewhere:
    # (1,1) is wasted and evicted first by the next miss, and its load is cancelled, never read.
    store = GatedStore()
    cache, _, stats = make_cache(2, store=store, async_loads=True)
    assert cache.prefetch((0, 0))
    assert store.started.wait(10)
    assert cache.prefetch((1, 1))
    cache.expire_prefetches(1, used={2})
    cache.reserve((1, 2))  # a miss: evicts (1,1) without waiting for the gate
    store.gate.set()
    gate = cache.wait((1, 2)).gate_proj.weight
    assert float(gate[0, 0]) == 12.0
    cache.release((1, 2))
    cache.drain()
    assert store.fetches == [(0, 0), (1, 2)] and cache.resident == {(0, 0), (1, 2)}
    assert (stats.total.prefetch_issued, stats.total.prefetch_wasted, stats.total.evictions) == (2, 1, 1)
    cache.close()


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu"])
def test_a_prefetch_its_layer_did_not_use_is_wasted_and_evicted_first(policy):
    # 3 slots: (0,0), (0,1), (0,0) used, then (1,3) prefetched for layer 1, which routes to expert 2
    # only. The prefetch is wasted at once (freeing the prefetch budget) and is the next victim:
    # without that, LRU would evict (0,1) and FIFO (0,0); LFU evicts it anyway (count 0).
    stats = Stats()
    cache = ExpertCache(FakeStore(), 3, LAYOUT, torch.device("cpu"), make_policy(policy), stats)
    run(cache, [(0, 0), (0, 1), (0, 0)])
    assert cache.prefetch((1, 3))
    cache.expire_prefetches(1, used={2})
    assert (stats.total.prefetch_wasted, cache.prefetched) == (1, 0)
    cache.expire_prefetches(1, used={2})  # nothing left to expire
    assert stats.total.prefetch_wasted == 1
    run(cache, [(1, 2)])  # the demand miss of layer 1 evicts one key
    assert cache.resident == {(0, 0), (0, 1), (1, 2)}
    cache.close()


def test_expiry_keeps_the_prefetches_a_layer_uses_and_those_of_other_layers():
    cache, _, stats = make_cache(4)
    assert cache.prefetch((1, 0)) and cache.prefetch((1, 1)) and cache.prefetch((2, 0))
    cache.expire_prefetches(1, used={0})  # layer 1 routes to 0 (reserved later): 1 wasted; layer 2's stays
    assert (stats.total.prefetch_wasted, cache.prefetched) == (1, 2)
    run(cache, [(1, 0), (2, 0)])
    t = stats.total
    assert (t.prefetch_used, t.prefetch_wasted, t.hits, t.misses) == (2, 1, 2, 0)
    cache.close()


def test_parse_prefetch_budget():
    assert parse_prefetch_budget("50%", 10) == 5
    assert parse_prefetch_budget(3, 10) == 3
    assert parse_prefetch_budget("0", 10) == 0
    assert parse_prefetch_budget(99, 10) == 10
    for bad in ("150%", "-1", "lots", True):
        with pytest.raises(BudgetError):
            parse_prefetch_budget(bad, 10)


# ----------------------------------------------------------------------------- in the model


class Fixed(Predictor):
    """Always predicts experts 0 and 1 (scores 2 and 1) for every layer ahead; records its contexts."""

    name = "fixed-test"

    def __init__(self, shape: MoEShape) -> None:
        super().__init__(shape)
        self.contexts: list[RouteContext] = []

    def predict(self, ctx: RouteContext, lookahead: int) -> np.ndarray:
        self.contexts.append(ctx)
        d = min(lookahead, self.shape.num_layers - 1 - ctx.layer)
        scores = np.zeros((d, ctx.tokens, self.shape.num_experts), dtype=np.float32)
        scores[:, :, 0], scores[:, :, 1] = 2, 1
        return scores


@pytest.fixture()
def fixed_predictor(monkeypatch):
    monkeypatch.setitem(PREDICTORS, Fixed.name, Fixed)


def test_prediction_counts_and_contexts(tiny_dir, fixed_predictor):
    # qwen2_moe's tiny model has MoE layers 0 and 2 (layer 1 is dense): MoE index 1 is model layer 2.
    model = offload.from_pretrained(tiny_dir("qwen2_moe"), device="cpu", predictor=Fixed.name, lookahead=2)
    routes: list[tuple[int, set[int]]] = []
    model.model.route_observers.append(lambda layer, e, w: routes.append((layer, set(e.unique().tolist()))))
    model.generate(PROMPT, max_new_tokens=4)
    predictor = model.model.prefetcher.predictor
    # Predicted sets are {0, 1} for MoE layer 1 (model layer 2), one per step; layer 0 is never predicted.
    actual = [used for layer, used in routes if layer == 2]
    p = model.stats.prediction[1]
    assert (p.predicted, p.actual, p.correct) == (2 * len(actual), sum(map(len, actual)),
                                                  sum(len(u & {0, 1}) for u in actual))
    assert set(model.stats.prediction) == {1}  # two MoE layers: nothing is two layers ahead
    # Contexts: the prompt step has 5 tokens and no known predecessors; a decode step has one token
    # whose predecessor's route is the previous step's.
    within = [c for c in predictor.contexts if c.layer >= 0]
    prompt_ctx, decode_ctx = within[0], within[-1]
    assert prompt_ctx.tokens == 5 and (prompt_ctx.prev == -1).all()
    assert decode_ctx.tokens == 1 and (decode_ctx.prev >= 0).all()
    assert decode_ctx.path.shape == (1, 1, 2)
    # Across the token boundary (lookahead 2 on 2 MoE layers): after MoE layer 0 the next token's layer 0 is
    # in reach, with this token's route so far as its prev; after layer 1 both of its layers, the route complete.
    # In the prompt step only the row's last token continues.
    across = [c for c in predictor.contexts if c.layer == -1]
    assert len(across) == 2 * 4 and all(c.tokens == 1 and c.path.shape == (1, 0, 2) for c in across)
    assert (across[-2].prev[0, 0] >= 0).all() and (across[-2].prev[0, 1] == -1).all() and (across[-1].prev >= 0).all()


@pytest.fixture(scope="module")
def mixtral_reference(tiny_dir):
    path = tiny_dir("mixtral")
    ids = torch.tensor([[0, 0, 5, 17, 33], [9, 8, 7, 6, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ref = offload.from_pretrained(path, device="cpu").generate(ids, attention_mask=mask, max_new_tokens=8)
    return path, ids, mask, ref


@settings(max_examples=14, deadline=None)
# learned needs trained weights: test_learned_uses_the_predictor_shipped_with_the_model
@given(predictor=st.sampled_from(sorted(set(PREDICTORS) - {"learned"})), lookahead=st.integers(1, 3),
       prefetch_budget=st.sampled_from([0, 1, 3, "50%", "100%"]), budget=st.sampled_from([1, 2, 5, "100%"]),
       offload_to=st.sampled_from(["disk", "ram"]), policy=st.sampled_from(["lru", "lfu", "fifo"]))
def test_tokens_do_not_depend_on_the_predictor(mixtral_reference, predictor, lookahead, prefetch_budget, budget,
                                               offload_to, policy):
    path, ids, mask, expected = mixtral_reference
    model = offload.from_pretrained(path, device="cpu", predictor=predictor, lookahead=lookahead,
                                    prefetch_budget=prefetch_budget, expert_budget=budget, offload_to=offload_to,
                                    policy=policy)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8), expected)
    t = model.stats.total
    assert t.prefetch_issued == t.prefetch_used + t.prefetch_wasted + model.cache.prefetched
    assert len(model.cache.resident) <= model.cache.num_slots
    model.cache.close()


def test_pregate_prefetches_what_the_next_layer_uses(tiny_dir):
    # On the bundled trained model pre-gating names most of the next layer's experts, and the
    # prefetches turn stalls into hits (the counts are deterministic: same tokens, same routes).
    plain = offload.from_pretrained("tiny-moe", device="cpu", expert_budget="50%", offload_to="ram")
    pre = offload.from_pretrained("tiny-moe", device="cpu", expert_budget="50%", offload_to="ram", predictor="pregate")
    ids = plain.encode("def fibonacci(n):\n    ")
    assert torch.equal(plain.generate(ids, max_new_tokens=24), pre.generate(ids, max_new_tokens=24))
    assert pre.stats.prediction[1].recall > 0.5
    assert pre.stats.total.misses < plain.stats.total.misses
    assert pre.stats.total.prefetch_used > 0
    pre.cache.close()


def test_learned_uses_the_predictor_shipped_with_the_model():
    # tiny-moe ships predictor.safetensors (scripts/train_predictor.py on its traces, lookahead 2)
    plain = offload.from_pretrained("tiny-moe", device="cpu", expert_budget="50%", offload_to="ram")
    learned = offload.from_pretrained("tiny-moe", device="cpu", expert_budget="50%", offload_to="ram",
                                      predictor="learned", lookahead=2)
    ids = plain.encode("import os\n\ndef main():\n    ")
    assert torch.equal(plain.generate(ids, max_new_tokens=16), learned.generate(ids, max_new_tokens=16))
    assert learned.stats.total.prefetch_used > 0
    assert learned.stats.total.misses < plain.stats.total.misses
    learned.cache.close()


@pytest.mark.parametrize("kwargs, match", [
    (dict(predictor="bogus"), "unknown predictor 'bogus'"),
    (dict(predictor="prev-token", lookahead=0), "lookahead"),
    (dict(predictor="prev-token", prefetch_budget="200%"), "prefetch budget"),
])
def test_bad_prefetch_options(tiny_dir, kwargs, match):
    with pytest.raises((ConfigError, BudgetError), match=match):
        offload.from_pretrained(tiny_dir("mixtral"), device="cpu", **kwargs)


@pytest.mark.parametrize("policy", ["lru", "fifo", "layer-lru", "predictive", "layer-budget"])
@pytest.mark.parametrize("capacity", [64, 128])
def test_runtime_prefetching_counts_what_the_simulator_counts(policy, capacity):
    """The runtime's prefetcher and cache, driven step by step as the model drives them, against
    simulate_prefetch with the same fitted markov predictor: equal hits, misses, evictions and prefetches."""
    import copy
    import dataclasses

    from offload.memory.prefetch import PrefetchConfig, Prefetcher
    from offload.sim.simulate import simulate_prefetch
    from offload.traces.format import read_trace
    from predictors.evaluate import PrefetchAdapter, select_seqs

    trace = read_trace(DATA / "mixtral-8x7b-humaneval.jsonl.gz")
    fitted = PREDICTORS["markov"](MoEShape(32, 8, 2), select_seqs(trace, [0]))
    test = select_seqs(trace, [1])
    test = dataclasses.replace(test, **{f: getattr(test, f)[:40] for f in  # its first 40 tokens
                                        ("seq", "pos", "phase", "experts", "weights", "imputed")})
    experts = test.experts.astype(np.int64)  # [tokens, layers, top_k]
    stats = Stats()
    cache = ExpertCache(FakeStore(), capacity, LAYOUT, torch.device("cpu"), make_policy(policy), stats,
                        layers=range(32))
    prefetcher = Prefetcher(copy.deepcopy(fitted), cache, stats, list(range(32)), PrefetchConfig(2, capacity))
    for t, token in enumerate(experts):
        prefetcher.begin_step(torch.ones(1, 1, dtype=torch.bool), torch.tensor([0]), torch.tensor([t == 0]))
        for layer, chosen in enumerate(token):
            step = cache.step(layer, sorted(chosen.tolist()))
            prefetcher.after_route(layer, torch.from_numpy(chosen[None]), torch.zeros(1, 4))
            for _ in step:
                pass
        prefetcher.end_step()
    r = simulate_prefetch(test, policy, "global", capacity, predictor=PrefetchAdapter(copy.deepcopy(fitted), 2),
                          pin_steps=True)
    t = stats.total
    assert (t.hits, t.misses, t.evictions) == (r.sim.hits, r.sim.misses, r.sim.evictions)
    assert (t.prefetch_issued, t.prefetch_used) == (r.issued, r.used)
    assert t.prefetch_wasted + cache.prefetched == r.wasted  # the simulator counts those left at the end too
