"""The expert cache: exact hit/miss/eviction counts per policy on hand-made sequences, pinning,
and the budget bound."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.experts.layouts import packed_layout
from offload.memory.cache import ExpertCache
from offload.memory.policies import POLICIES, make_policy
from offload.stats import Stats
from tests.paths import DATA

H, I = 4, 6
LAYOUT = packed_layout(H, I, torch.float32)


class FakeStore:
    """A RAM-like store whose expert (l, e) is filled with the value 10*l + e, so loads are checkable."""

    raw_nbytes = 0
    native_formats = (LAYOUT,)

    def __init__(self) -> None:
        self.fetches: list = []

    def fetch(self, key, scratch):
        self.fetches.append(key)
        buf = torch.full((LAYOUT.nbytes // 4,), float(10 * key[0] + key[1])).view(torch.uint8)
        return buf, LAYOUT

    def close(self) -> None:
        pass


def make_cache(slots: int, policy: str) -> tuple[ExpertCache, FakeStore, Stats]:
    store, stats = FakeStore(), Stats()
    return ExpertCache(store, slots, LAYOUT, torch.device("cpu"), make_policy(policy), stats), store, stats


def run(cache: ExpertCache, keys) -> None:
    for key in keys:
        gate = cache.acquire(key).gate_proj.weight
        assert float(gate[0, 0]) == 10 * key[0] + key[1]  # the slot holds this expert's bytes
        cache.release(key)


# One layer, experts a=0 b=1 c=2 d=3, 2 slots: a b a c b d a
SEQ = [(0, e) for e in (0, 1, 0, 2, 1, 3, 0)]


@pytest.mark.parametrize(
    "policy, hits, misses, evictions",
    [
        # lru:  a b | a hit | c evicts b | b evicts a | d evicts c | a evicts b           -> 1 hit
        ("lru", 1, 6, 4),
        # fifo: a b | a hit | c evicts a | b hit | d evicts b | a evicts c                -> 2 hits
        ("fifo", 2, 5, 3),
        # lfu:  a b | a hit (a:2) | c evicts b (1) | b evicts c (1, older) | d evicts b (count 2 vs a 2:
        #       tie broken by least recent use: a used at t3, b at t5 -> a) | a evicts d (1)  -> 1 hit
        ("lfu", 1, 6, 4),
    ],
)
def test_exact_counts_on_a_hand_made_sequence(policy, hits, misses, evictions):
    cache, store, stats = make_cache(2, policy)
    run(cache, SEQ)
    total = stats.total
    assert (total.hits, total.misses, total.evictions) == (hits, misses, evictions)
    assert len(store.fetches) == misses  # every miss is exactly one load
    assert total.bytes_loaded == misses * LAYOUT.nbytes


def test_counts_are_per_layer():
    cache, _, stats = make_cache(3, "lru")
    run(cache, [(0, 1), (1, 1), (0, 1), (2, 5), (1, 1)])
    assert (stats.layer(0).hits, stats.layer(0).misses) == (1, 1)
    assert (stats.layer(1).hits, stats.layer(1).misses) == (1, 1)
    assert (stats.layer(2).hits, stats.layer(2).misses) == (0, 1)


def test_warm_start_loads_while_slots_last_and_counts_the_hits_it_made():
    a, b, c, d = [(0, e) for e in range(4)]
    cache, store, stats = make_cache(3, "lru")
    run(cache, [a, b])
    # c takes the free slot; a is resident already; d finds no slot: b is protected (another request's), a and c
    # are the warm start's own
    assert cache.warm([c, a, d], protect=[b]) == 1 and cache.resident == {a, b, c}
    assert (stats.total.warm_loads, stats.total.misses, stats.total.hits) == (1, 2, 0)  # loads are not accesses
    run(cache, [c, c, d])  # c: a hit made by the warm start (once); d: a miss that evicts a (LRU; c just ran)
    t = stats.total
    assert (t.hits, t.misses, t.evictions, t.warm_loads, t.warm_hits) == (2, 3, 1, 1, 1)
    assert store.fetches == [a, b, c, d]


def test_a_warm_start_evicts_by_the_policy_and_a_warm_expert_evicted_unused_made_no_hit():
    a, b, c, d = [(0, e) for e in range(4)]
    cache, store, stats = make_cache(2, "lru")
    run(cache, [a, b])
    assert cache.warm([c]) == 1 and cache.resident == {b, c} and stats.total.evictions == 1  # a was the LRU
    run(cache, [a, d, c])  # a evicts b, d evicts c before anyone used it; c misses
    t = stats.total
    assert (t.hits, t.misses, t.warm_loads, t.warm_hits) == (0, 5, 1, 0)


def test_pinned_experts_are_never_evicted():
    cache, _, _ = make_cache(2, "lru")
    cache.acquire((0, 0))
    cache.acquire((0, 1))
    assert not cache.can_acquire((0, 2))
    with pytest.raises(RuntimeError):
        cache.acquire((0, 2))
    cache.release((0, 1))
    cache.acquire((0, 2))  # evicts (0, 1), the only unpinned one, although (0, 0) is older
    assert (0, 0) in cache and (0, 1) not in cache


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(1, 6), policy=st.sampled_from(sorted(POLICIES)),
       keys=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4)), max_size=80))
def test_budget_bound_and_accounting(slots, policy, keys):
    cache, store, stats = make_cache(slots, policy)
    nbytes = cache.resident_nbytes
    for key in keys:
        run(cache, [key])
        assert len(cache.resident) <= slots
        assert cache.resident_nbytes == nbytes == slots * cache.slot_nbytes
    total = stats.total
    assert total.hits + total.misses == len(keys)
    assert total.misses == len(store.fetches)
    assert total.evictions == max(0, total.misses - slots)  # the cache never frees a slot by itself


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
@pytest.mark.parametrize("capacity", [1, 7, 64, 128])
def test_runtime_cache_counts_equal_the_simulator(policy, capacity):
    """The runtime cache and the numba simulator implement the same policies: same counts on a real trace."""

    from offload.sim.simulate import AccessStream, simulate
    from offload.traces.format import read_trace

    trace = read_trace(DATA / "mixtral-8x7b-humaneval.jsonl.gz")
    experts = trace.experts[:120]  # [tokens, layers, top_k]: the first 120 tokens, 7,680 accesses
    cache, _, stats = make_cache(capacity, policy)
    for token in experts:
        for layer, chosen in enumerate(token):
            run(cache, [(layer, int(e)) for e in chosen])
    sim = simulate(AccessStream.from_experts(experts, trace.header.num_experts), policy, "global", capacity)
    assert (stats.total.hits, stats.total.misses, stats.total.evictions) == (sim.hits, sim.misses, sim.evictions)
    assert [stats.layer(i).hits for i in range(32)] == list(sim.hits_per_layer)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("capacity", [1, 7, 64, 128])
def test_runtime_layer_steps_count_what_the_step_pinned_simulator_counts(policy, capacity):
    """The MoE layer's own path (cache.step, as model._run_experts uses it) against simulate(pin_steps=True)."""

    from offload.sim.simulate import AccessStream, simulate
    from offload.traces.format import read_trace

    trace = read_trace(DATA / "mixtral-8x7b-humaneval.jsonl.gz")
    experts = trace.experts[:120]  # [tokens, layers, top_k]
    store, stats = FakeStore(), Stats()
    cache = ExpertCache(store, capacity, LAYOUT, torch.device("cpu"), make_policy(policy), stats, layers=range(32))
    for token in experts:
        for layer, chosen in enumerate(token):
            for e, expert in cache.step(layer, sorted(int(x) for x in chosen)):  # sorted: torch.unique's order
                assert float(expert.gate_proj.weight[0, 0]) == 10 * layer + e
    sim = simulate(AccessStream.from_experts(experts, trace.header.num_experts), policy, "global", capacity,
                   pin_steps=True)
    assert (stats.total.hits, stats.total.misses, stats.total.evictions) == (sim.hits, sim.misses, sim.evictions)
    assert [stats.layer(i).evictions for i in range(32)] == list(sim.evictions_per_layer)
    assert len(store.fetches) == sim.misses


def test_a_layer_step_pins_its_experts_and_takes_resident_ones_first():
    # 2 slots holding (0, 0) and (0, 1); a step needing experts 2 and 0: 0 is handed out first (a hit, pinned),
    # 2's miss must evict (0, 1), the one expert outside the step, although (0, 0) is older under LRU.
    cache, store, stats = make_cache(2, "lru")
    run(cache, [(0, 0), (0, 1)])
    handed = [e for e, _ in cache.step(0, [2, 0])]
    assert handed == [0, 2] and cache.resident == {(0, 0), (0, 2)}
    # a step wider than the cache: each expert handed back makes room for the next
    assert [e for e, _ in cache.step(1, [0, 1, 2])] == [0, 1, 2] and len(cache.resident) == 2


def test_a_step_hands_out_in_batches_what_has_landed():
    """batches() (the fused layer call's) hands out every pinned expert whose bytes are in, in hand-out order, and
    releases a batch when the next is asked for; synchronous loads land at once, so a step that fits is one batch."""
    cache, _, _ = make_cache(2, "lru")
    run(cache, [(0, 0)])
    with cache.step(0, [1, 0, 2]) as step:  # 2 slots: 0 (resident) and 1 first, 2 once they are handed back
        assert [[e for e, _ in batch] for batch in step.batches()] == [[0, 1], [2]]
    cache.check()
    gates = {e: threading.Event() for e in (1, 2)}
    cache = ExpertCache(GatedStore(gates), 3, LAYOUT, torch.device("cpu"), make_policy("lru"), Stats(),
                        async_loads=True)
    run(cache, [(0, 0)])
    with cache.step(0, [2, 0, 1]) as step:
        batches = step.batches()
        assert [e for e, _ in next(batches)] == [0]  # 1 and 2 are still loading
        for gate in gates.values():
            gate.set()
        while not (cache.landed((0, 1)) and cache.landed((0, 2))):
            time.sleep(0.001)
        assert [(e, float(x.gate_proj.weight[0, 0])) for e, x in next(batches)] == [(2, 2.0), (1, 1.0)]
        assert cache.pinned == {(0, 1), (0, 2)}
    assert cache.pinned == set()
    cache.close()


class GatedStore(FakeStore):
    """FakeStore whose fetch of expert e waits for ``gates[e]`` (a load still in flight until the test opens it)."""

    def __init__(self, gates: dict) -> None:
        super().__init__()
        self.gates = gates

    def fetch(self, key, scratch):
        if key[1] in self.gates:
            self.gates[key[1]].wait(10)
        return super().fetch(key, scratch)


# -- failures: a failed or interrupted load, a step left early, a broken invariant -----------------------------


class FailingStore(FakeStore):
    """FakeStore whose fetch of the keys in ``fail`` raises ``error`` (once each), as a disk read that hits EIO."""

    def __init__(self, fail: set, error: BaseException) -> None:
        super().__init__()
        self.fail, self.error = set(fail), error

    def fetch(self, key, scratch):
        if key in self.fail:
            self.fail.discard(key)
            raise self.error
        return super().fetch(key, scratch)


def failing_cache(slots: int, fail: set, error: BaseException, async_loads: bool = False) -> ExpertCache:
    return ExpertCache(FailingStore(fail, error), slots, LAYOUT, torch.device("cpu"), make_policy("lru"), Stats(),
                       async_loads=async_loads)


def handed(cache: ExpertCache, layer: int, needed: list[int]) -> dict[int, float]:
    """Run one layer step to its end: each expert's first value (10 * layer + expert when its bytes are right)."""
    with cache.step(layer, needed) as step:
        return {e: float(x.gate_proj.weight[0, 0]) for e, x in step}


@pytest.mark.parametrize("async_loads", [False, True])
def test_a_failed_load_is_forgotten_and_the_next_demand_loads_it_again(async_loads):
    eio = OSError(5, "Input/output error")
    cache = failing_cache(3, {(0, 1)}, eio, async_loads)
    handed(cache, 0, [0])
    with pytest.raises(OSError, match="Input/output error"):
        handed(cache, 0, [0, 1, 2])
    cache.check()                                         # nothing pinned, slots partitioned, no half-filled slot
    assert (0, 1) not in cache and cache.pinned == set()
    assert handed(cache, 0, [0, 1, 2]) == {0: 0.0, 1: 1.0, 2: 2.0}   # loaded again, right bytes
    cache.close()


@pytest.mark.parametrize("where", [0, 1, 2])
def test_leaving_a_step_early_releases_every_pin(where):
    cache, _, _ = make_cache(2, "lru")
    with pytest.raises(KeyboardInterrupt):
        with cache.step(0, [0, 1, 2]) as step:         # wider than the cache: pins as it goes
            for n, _ in enumerate(step):
                if n == where:
                    raise KeyboardInterrupt
    cache.check()
    assert handed(cache, 0, [0, 1, 2]) == {0: 0.0, 1: 1.0, 2: 2.0}


def test_an_interrupted_load_leaves_nothing_resident():
    cache = failing_cache(2, {(0, 1)}, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        handed(cache, 0, [1])
    cache.check()
    assert cache.resident == set() and handed(cache, 0, [1]) == {1: 1.0}


def test_a_step_that_cannot_place_an_expert_raises_instead_of_skipping_it():
    from offload.memory.cache import CacheStateError

    cache, _, _ = make_cache(2, "lru")
    cache.acquire((0, 0))
    cache.acquire((0, 1))                                 # pins held outside any step (a bug elsewhere)
    with pytest.raises(CacheStateError, match="no free slot for expert 2"):
        handed(cache, 1, [2])
    with pytest.raises(CacheStateError, match=r"experts \[\(0, 0\), \(0, 1\)\] are still pinned"):
        cache.check()


def test_check_names_what_is_inconsistent():
    from offload.memory.cache import CacheStateError

    cache, _, _ = make_cache(3, "lru")
    run(cache, [(0, 0), (0, 1)])
    cache.check()
    cache._free.append(cache._slot_of[(0, 0)])            # a slot both free and holding (0, 0)
    with pytest.raises(CacheStateError, match="slots are not partitioned"):
        cache.check(idle=False)
