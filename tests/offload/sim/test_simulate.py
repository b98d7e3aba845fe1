"""offload/sim/simulate.py: exact counts on hand-made streams (access by access and in pinned layer
steps), agreement with the oracles of tests/reference.py, Belady's optimality, the HumanEval
reference table, and the prefetch path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.errors import BudgetError, ConfigError, PolicyError
from offload.sim.simulate import SIM_POLICIES, AccessStream, Proposal, Step, _PyCaches, simulate, simulate_prefetch
from offload.traces.format import read_trace
from tests import reference

TESTS = Path(__file__).parents[2]

POLICIES = ["lru", "lfu", "fifo", "belady"]  # the reference table's; the layer-aware ones are tested below
KERNEL_POLICIES = [p for p, code in SIM_POLICIES.items() if code >= 0]
HUMANEVAL = TESTS / "data" / "mixtral-8x7b-humaneval.jsonl.gz"


def flat(stream: list[int]) -> AccessStream:
    """A single-layer, top-1 stream: every key is its own expert, so both scopes see one cache."""
    return AccessStream(np.array(stream, dtype=np.int32), 1, max(stream) + 1, 1)


@pytest.fixture(scope="module")
def humaneval() -> AccessStream:
    return AccessStream.from_trace(read_trace(HUMANEVAL))


# Worked by hand, capacity 2, A=0 B=1 C=2 D=3:  A D B A B C A C B
#   lru    m m m(A) m(D) h m(A) m(B) h m(A)            2 hits
#   lfu    ... A(count 2) beats B(2, older) at C; C(1) goes at A; B(2, older) at C; C(2) at B:  1 hit
#   fifo   m m m(A) m(D) h m(B) h h m(A)               3 hits
#   belady m m m(D: never) h h m(B: at 8, A at 6) h h m(C: tie "never", larger key)   4 hits = optimum
HAND = [0, 3, 1, 0, 1, 2, 0, 2, 1]
HAND_COUNTS = {"lru": (2, 7, 5), "lfu": (1, 8, 6), "fifo": (3, 6, 4), "belady": (4, 5, 3)}


@pytest.mark.parametrize("policy", POLICIES)
def test_hand_made_stream_exact_counts(policy: str) -> None:
    for run in (simulate, lambda *a: simulate_prefetch(*a).sim):
        r = run(flat(HAND), policy, "global", 2)
        assert (r.hits, r.misses, r.evictions) == HAND_COUNTS[policy]
        assert r.accesses == len(HAND) and r.hit_rate == HAND_COUNTS[policy][0] / len(HAND)
    assert reference.optimal_misses(HAND, 2) == HAND_COUNTS["belady"][1]


def test_per_layer_caches_are_independent() -> None:
    # 3 experts, 2 layers, top-2, C=2: layer 0 sees 0 1 2 0 1 2 (LRU thrashes: 6 misses, 4 evictions),
    # layer 1 sees 2 0 2 1 0 2 (one hit, 5 misses, 3 evictions).
    experts = np.array([[[0, 1], [2, 0]], [[2, 0], [2, 1]], [[1, 2], [0, 2]]])
    r = simulate(AccessStream.from_experts(experts, 3), "lru", "per-layer", 2)
    assert (r.hits_per_layer, r.misses_per_layer, r.evictions_per_layer) == ((0, 1), (6, 5), (4, 3))
    assert r.num_tokens == 3 and r.misses_per_token == 11 / 3


def test_capacity_beyond_the_keys_only_has_cold_misses(humaneval: AccessStream) -> None:
    for scope, capacity in (("per-layer", 9), ("global", 1000)):
        r = simulate(humaneval, "lru", scope, capacity)
        assert (r.misses, r.evictions) == (256, 0)


@st.composite
def routing(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """Small random traces: [tokens, layers, top_k] distinct expert ids per layer."""
    num_experts = draw(st.integers(2, 5))
    layers, top_k, tokens = draw(st.integers(1, 3)), draw(st.integers(1, min(3, num_experts))), draw(st.integers(1, 10))
    perms = st.permutations(range(num_experts)).map(lambda p: list(p[:top_k]))
    rows = draw(st.lists(st.lists(perms, min_size=layers, max_size=layers), min_size=tokens, max_size=tokens))
    return np.array(rows, dtype=np.int16), num_experts


def per_layer(counts: dict[int, int], stream: AccessStream) -> tuple[int, ...]:
    out = [0] * stream.num_layers
    for key, n in counts.items():
        out[key // stream.num_experts] += n
    return tuple(out)


@settings(max_examples=150, deadline=None)
@given(routing(), st.sampled_from(POLICIES), st.sampled_from(["per-layer", "global"]), st.integers(1, 8))
def test_kernel_matches_reference(trace: tuple[np.ndarray, int], policy: str, scope: str, capacity: int) -> None:
    stream = AccessStream.from_experts(*trace)
    keys = stream.keys.tolist()
    part = (lambda k: k // stream.num_experts) if scope == "per-layer" else (lambda k: 0)
    ref = reference.ref_simulate(keys, policy, capacity, part)
    r = simulate(stream, policy, scope, capacity)
    assert r.hits_per_layer == per_layer(ref.hits, stream)
    assert r.misses_per_layer == per_layer(ref.misses, stream)
    assert r.evictions_per_layer == per_layer(ref.evictions, stream)
    assert simulate_prefetch(stream, policy, scope, capacity).sim == r  # the Python twin agrees too


@settings(max_examples=200, deadline=None)
@given(routing(), st.sampled_from(KERNEL_POLICIES), st.sampled_from(["per-layer", "global"]), st.integers(1, 8),
       st.booleans())
def test_kernels_match_the_step_oracle(trace: tuple[np.ndarray, int], policy: str, scope: str, capacity: int,
                                       pin_steps: bool) -> None:
    """Both replays of every kernel policy, against an oracle that scans every candidate (and the Python twin)."""
    stream = AccessStream.from_experts(*trace)
    part = (lambda k: k // stream.num_experts) if scope == "per-layer" else (lambda k: 0)
    ref = reference.ref_simulate_steps(stream.keys.tolist(), policy, capacity, stream.num_experts, stream.top_k,
                                       part, pin_steps)
    r = simulate(stream, policy, scope, capacity, pin_steps=pin_steps)
    assert (r.hits_per_layer, r.misses_per_layer, r.evictions_per_layer) == (
        per_layer(ref.hits, stream), per_layer(ref.misses, stream), per_layer(ref.evictions, stream))
    assert simulate_prefetch(stream, policy, scope, capacity, pin_steps=pin_steps).sim == r


# 1 layer, 4 experts, top-2, one cache of 2: steps (a b) (c a). Access by access, LRU: a b miss, c evicts a
# (older), a evicts b: 4 misses. Pinned as the runtime runs it: step 2 takes resident a first (a hit, pinned),
# then c evicts b, the only key outside the step: 3 misses, 1 hit.
PINNED = np.array([[[0, 1]], [[2, 0]]])


@pytest.mark.parametrize("policy", KERNEL_POLICIES + ["predictive", "layer-budget"])
def test_a_pinned_step_takes_its_resident_keys_first(policy: str) -> None:
    stream = AccessStream.from_experts(PINNED, 4)
    r = simulate(stream, policy, "global", 2, pin_steps=True)
    assert (r.hits, r.misses, r.evictions, r.pin_steps) == (1, 3, 1, True)
    if policy == "lru":
        assert (simulate(stream, "lru", "global", 2).hits, simulate(stream, "lru", "global", 2).misses) == (0, 4)
    # a cache smaller than a step: its earliest-used key makes room, in both replays
    assert simulate(stream, policy, "global", 1, pin_steps=True).misses == 4


# 3 layers x 2 experts, top-1, one cache of 4 (a=0 b=1; "1b" = layer 1, expert b). Tokens: aaa baa aba baa.
#   t0: 0a 1a 2a miss; t1: 0b miss (4th slot), 1a 2a hit; t2: 0a hit, 1b misses with all 4 resident, 2a hit.
#   lru:       1b evicts 0b (least recent); t3: 0b evicts 1a, 1a evicts 0a, 2a hit     -> 5 hits, evicted 0 0 1
#   layer-lru: 1b evicts 1a (its own layer runs again last); t3: 0b hit, 1a evicts 1b   -> 6 hits, evicted 1 1
#   fifo:      1b evicts 0a (first in); t3: all hit                                      -> 7 hits (= belady)
#   predictive (decay 1/2; worth = p / steps until the key's layer runs again):
#     at 1b: 0a .625 / 2, 0b .25 / 2, 1a .375 / 3, 2a .75 / 1: 0b and 1a tie at .125, 0b is less recent
#     at 0b: 0a .3125 / 3, 1a .375 / 1, 1b .5 / 1, 2a .875 / 2                        -> evicts 0a: 6 hits
CYCLE = np.array([[[0], [0], [0]], [[1], [0], [0]], [[0], [1], [0]], [[1], [0], [0]]])
CYCLE_COUNTS = {"lru": (5, (2, 1, 0)), "layer-lru": (6, (0, 2, 0)), "fifo": (7, (1, 0, 0)),
                "predictive": (6, (2, 0, 0)), "belady": (7, (1, 0, 0))}


@pytest.mark.parametrize("policy", sorted(CYCLE_COUNTS))
@pytest.mark.parametrize("pin_steps", [False, True])
def test_layer_aware_policies_on_a_hand_made_cycle(policy: str, pin_steps: bool) -> None:
    r = simulate(AccessStream.from_experts(CYCLE, 2), policy, "global", 4, pin_steps=pin_steps)
    hits, evicted = CYCLE_COUNTS[policy]
    assert (r.hits, r.misses, r.evictions_per_layer) == (hits, 12 - hits, evicted)


def test_predictive_takes_the_predictors_probabilities_and_drops_a_wrong_prefetch_first() -> None:
    # CYCLE with one prefetch: after t1's layer 0 the predictor proposes 1b, p(1b) = .9. The cache is full
    # (0b just missed, pinned): 1b evicts 0a (worth .25 / 3, against 1a .5 / 1, 2a .25 / 2). Layer 1 uses
    # 1a, not 1b: 1b earns no credit, so t2's 0a miss evicts it (p = the floor) rather than 0b (.25 / 3); 1b
    # then misses and evicts 0b (tie with 1a at .125, less recent), and t3's 0b evicts 0a (.3125 / 3).
    def predictor(step: Step) -> Proposal:
        if step.token == 1 and step.layer == 0:
            return Proposal([step.key(1, 1)], {1: np.array([0.0, 0.9])})
        return Proposal([])

    r = simulate_prefetch(AccessStream.from_experts(CYCLE, 2), "predictive", "global", 4, predictor=predictor)
    assert (r.sim.hits, r.sim.misses, r.sim.evictions_per_layer) == (5, 7, (3, 1, 0))
    assert (r.issued, r.used, r.wasted) == (1, 0, 1)


# 2 layers x 4 experts, top-1, one cache of 4, budgets 2 + 2. Layer 0 cycles a b c a b c ..., layer 1 uses
# b c, then a, then d once. t2: 0c and 1a miss, each layer at its budget evicts its own LRU (0a, 1b);
# t3: 0a misses on a key in its ghost list -> layer 0 takes a slot from layer 1 (budgets 3 + 1), evicting
# its own 0b first; t4: 0b misses under budget -> layer 1 (2 resident, budget 1) gives up 1c; t5-t7 layer 0's
# three keys all hit; t7: 1d evicts 1a (its layer is at budget), t8: 1a is a ghost hit: back to 2 + 2.
# 8 hits, 10 misses; lru gets 8 too but evicts layer 0's keys 4 times instead of 2.
BUDGET = np.array([[[a], [b]] for a, b in [(0, 1), (1, 2), (2, 0), (0, 0), (1, 0), (2, 0), (0, 0), (1, 3), (2, 0)]])


def test_layer_budget_moves_slots_to_the_layer_that_needs_them() -> None:
    stream = AccessStream.from_experts(BUDGET, 4)
    r = simulate_prefetch(stream, "layer-budget", "global", 4)
    assert (r.sim.hits, r.sim.misses, r.sim.evictions_per_layer) == (8, 10, (2, 4))
    assert simulate(stream, "lru", "global", 4).evictions_per_layer == (4, 2)
    caches = _PyCaches(stream, "layer-budget", "global", 4)
    budgets = []
    for token in BUDGET:
        for layer, (e,) in enumerate(token):
            caches.begin_layer(layer)
            caches.access(layer * 4 + int(e))
        budgets.append(dict(caches.policies[0].budget))
    assert [b[0] for b in budgets] == [2, 2, 2, 3, 3, 3, 3, 3, 2]
    assert all(sum(b.values()) == 4 for b in budgets)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=11), st.integers(1, 3))
def test_belady_is_optimal_and_bounds_every_policy(stream: list[int], capacity: int) -> None:
    best = reference.optimal_misses(stream, capacity)
    assert simulate(flat(stream), "belady", "global", capacity).misses == best
    for policy in ("lru", "lfu", "fifo"):
        assert simulate(flat(stream), policy, "global", capacity).misses >= best


def test_humaneval_reference_table_exactly(humaneval: AccessStream) -> None:
    # The baselines come from an independent stdlib-only script; equal floats mean equal hit counts.
    base = json.loads((TESTS / "data" / "mixtral-8x7b-humaneval.baselines.json").read_text())
    assert humaneval.keys.size == base["accesses"] == 21632
    for capacity, row in base["per_layer"].items():
        for policy, rate in row.items():
            r = simulate(humaneval, policy, "per-layer", int(capacity))
            assert r.hit_rate == rate and r.hits == round(rate * 21632), (capacity, policy)
    for row in base["global"].values():
        for policy in ("lru", "belady"):
            assert simulate(humaneval, policy, "global", row["capacity"]).hit_rate == row[policy]
    # the printed table, spot-checked to 4 decimals, and C=1 equal for all policies
    assert f"{simulate(humaneval, 'belady', 'global', 64).hit_rate:.4f}" == "0.6097"
    assert {simulate(humaneval, p, "per-layer", 1).hits for p in POLICIES} == {1905}


@pytest.mark.parametrize("policy", POLICIES)
def test_prefetch_path_without_predictor_equals_kernel_on_humaneval(humaneval: AccessStream, policy: str) -> None:
    for scope, capacity in (("per-layer", 3), ("global", 128)):
        r = simulate_prefetch(humaneval, policy, scope, capacity)
        assert r.sim == simulate(humaneval, policy, scope, capacity)
        assert (r.issued, r.used, r.wasted, r.stalls) == (0, 0, 0, 0)


# 4 experts, 2 layers, top-1: keys are layer * 4 + expert, the stream is 0 5 2 5 0 7.
PREFETCH = np.array([[[0], [1]], [[2], [1]], [[0], [3]]])
PREFETCH_KEYS = [0, 5, 2, 5, 0, 7]


def oracle(step: Step) -> list[int]:
    """Knows the future: prefetches the next step's key."""
    s = step.token * 2 + step.layer
    return PREFETCH_KEYS[s + 1: s + 2]


def test_perfect_prefetch_turns_every_later_access_into_a_hit() -> None:
    # C=1 per layer. Step 0 misses; 0->5, 1->2 (evicts 0), 3->0 (evicts 2), 4->7 (evicts 5) are
    # issued and all used; step 2's proposal 5 is already resident, so it is not issued.
    stream = AccessStream.from_experts(PREFETCH, 4)
    r = simulate_prefetch(stream, "lru", "per-layer", 1, predictor=oracle)
    assert (r.sim.hits, r.sim.misses, r.sim.evictions_per_layer) == (5, 1, (2, 1))
    assert (r.issued, r.used, r.wasted, r.stalls) == (4, 4, 0, 0)
    # each prefetch is demanded one step after it is issued: with a 2-step transfer all four stall
    assert simulate_prefetch(stream, "lru", "per-layer", 1, predictor=oracle, latency=2).stalls == 4


def test_wrong_prefetch_is_wasted_and_never_evicts_the_current_keys() -> None:
    # Always proposes layer 0 / expert 1 (key 1), never used. While layer 0 computes its key is
    # pinned, so the proposal is dropped at steps 0, 2, 4; at steps 1, 3, 5 it evicts layer 0's key
    # (0, 2, 0), the next layer-0 demand evicts it again: 3 issued, 3 wasted, 1 hit (5 at step 3).
    stream = AccessStream.from_experts(PREFETCH, 4)
    r = simulate_prefetch(stream, "lru", "per-layer", 1, predictor=lambda step: [1])
    assert (r.sim.hits, r.sim.misses, r.sim.evictions_per_layer) == (1, 5, (5, 1))
    assert (r.issued, r.used, r.wasted, r.stalls) == (3, 0, 3, 0)
    # key 0's second miss (step 4) is charged to the prefetch at step 1, a layer before key 0's own; the rest are cold
    assert r.miss_causes == {"cold": 4, "prefetch +1": 1}
    assert r.loads == 8 and r.effective_hit_rate == pytest.approx(1 / 6)


def test_a_prefetch_never_evicts_a_key_proposed_ahead_of_it() -> None:
    # PREFETCH, one cache of 1 per layer; after each layer-0 step the predictor proposes 4 then 5 for layer 1.
    # t0: 4 takes the free slot; 5 would have to evict 4, proposed ahead of it: dropped (as the runtime does).
    # Layer 1 demands 5, which evicts 4. t1 and t2: 4 may evict 5 (proposed after it), 5 then may not evict 4;
    # layer 1 misses on 5 and 7. 3 prefetches, no hit.
    stream = AccessStream.from_experts(PREFETCH, 4)
    both = lambda step: [4, 5] if step.layer == 0 else []  # noqa: E731
    r = simulate_prefetch(stream, "lru", "per-layer", 1, predictor=both)
    assert (r.issued, r.sim.hits) == (3, 0)
    # without the protection (the simulator before it matched the runtime) 4 then 5 are loaded at every
    # layer-0 step, each evicting the other: 6 loads, and layer 1 hits on the second at t0 and t1
    r = simulate_prefetch(stream, "lru", "per-layer", 1, predictor=both, protect_proposals=False)
    assert (r.issued, r.sim.hits) == (6, 2)


def test_predictor_sees_only_the_past() -> None:
    seen: list[tuple[int, int, tuple, list]] = []

    def spy(step: Step) -> list[int]:
        seen.append((step.token, step.layer, step.past.shape, step.current.tolist()))
        return []

    simulate_prefetch(AccessStream.from_experts(PREFETCH, 4), "fifo", "global", 2, predictor=spy)
    assert seen[3] == (1, 1, (1, 2, 1), [[2], [1]])  # token 1 after layer 1: token 0 in past
    assert len(seen) == 6


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu"])
def test_a_prefetch_its_layer_did_not_use_is_evicted_first(policy: str) -> None:
    # Keys 0 4 1 4 0 4 (2 layers x 4 experts, top-1), one global cache of 3. After step 0 a guess
    # prefetches key 5, which layer 1 does not use: wasted, and first in line, so step 2's miss on 1
    # evicts 5 rather than 0, and step 4's 0 hits (LRU without demotion would evict 0 and miss it).
    stream = AccessStream.from_experts(np.array([[[0], [0]], [[1], [0]], [[0], [0]]]), 4)
    r = simulate_prefetch(stream, policy, "global", 3,
                          predictor=lambda step: [5] if step.token == step.layer == 0 else [])
    assert (r.issued, r.used, r.wasted) == (1, 0, 1)
    assert (r.sim.misses, r.sim.hits) == (3, 3)


def test_bad_arguments_raise_project_errors() -> None:
    s = flat(HAND)
    with pytest.raises(PolicyError, match="unknown simulator policy 'mru'"):
        simulate(s, "mru")
    with pytest.raises(BudgetError):
        simulate(s, "lru", "global", 0)
    with pytest.raises(ConfigError, match="scope"):
        simulate(s, "lru", "per-expert", 2)
    with pytest.raises(ConfigError, match="predictor proposed key 9"):
        simulate_prefetch(s, "lru", "global", 2, predictor=lambda step: [9])
    with pytest.raises(ConfigError, match="whole number of tokens"):
        AccessStream(np.arange(3, dtype=np.int32), 2, 2, 1)
