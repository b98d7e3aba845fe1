"""offload/memory/policies.py: each policy's victim on hand-made sequences, demotion, the layer clock, the
layer-aware policies' rules, and the registry."""

from __future__ import annotations

import pytest

from offload.errors import PolicyError
from offload.memory.policies import POLICIES, LayerClock, make_policy


def drive(name: str, events: list[tuple[str, str]]):
    policy = make_policy(name)
    for kind, key in events:
        {"insert": policy.on_insert, "hit": lambda k: policy.on_access(k, True), "evict": policy.on_evict,
         "demote": policy.on_demote}[kind](key)
        if kind == "insert":
            policy.on_access(key, False)
    return policy


EVENTS = [("insert", "a"), ("insert", "b"), ("insert", "c"), ("hit", "a"), ("hit", "a"), ("hit", "b")]


@pytest.mark.parametrize("name, victim", [("lru", "c"), ("fifo", "a"), ("lfu", "c")])
def test_victims(name, victim):
    assert drive(name, EVENTS).victim(["a", "b", "c"]) == victim


def test_victim_only_among_candidates_and_demotion_goes_first():
    assert drive("lru", EVENTS).victim(["a", "b"]) == "a"  # c is pinned: a is older than b
    assert drive("lru", [*EVENTS, ("demote", "a")]).victim(["a", "b", "c"]) == "a"
    assert drive("fifo", [*EVENTS, ("demote", "c")]).victim(["a", "b", "c"]) == "c"
    # LFU keeps its counts on demotion: they already rank a prefetch nobody used
    assert drive("lfu", [*EVENTS, ("demote", "a")]).victim(["a", "b", "c"]) == "c"


def test_lfu_counts_survive_eviction():
    policy = drive("lfu", [*EVENTS, ("evict", "a"), ("insert", "a"), ("insert", "d")])
    assert policy.victim(["a", "d", "b"]) == "d"  # a: 4 accesses in all, b: 2, d: 1


def test_layer_clock_counts_steps_to_each_layers_next_visit():
    clock = LayerClock()
    clock.set_layers([0, 1, 2, 3])
    clock.visit(1)
    assert [clock.distance(layer) for layer in range(4)] == [3, 4, 1, 2]  # the current layer: a whole cycle
    learned = LayerClock()  # without the layer list: learned from visits, unseen layers placed by index
    learned.visit(0)
    learned.visit(2)
    assert (learned.distance(1), learned.distance(5), learned.distance(0), learned.cycle) == (2, 1, 1, 2)


class Decode:
    """Drives a policy like the cache does: a layer step, then its accesses (inserting keys not resident)."""

    def __init__(self, name: str, slots: int, layers: list[int], **options) -> None:
        self.policy = make_policy(name, **options)
        self.policy.attach(slots, layers)
        self.resident: set = set()

    def visit(self, layer: int, *keys) -> None:
        self.policy.on_layer(layer)
        for key in keys:
            if key not in self.resident:
                self.resident.add(key)
                self.policy.on_insert(key)
            self.policy.on_access(key, hit=False)


def test_layer_lru_evicts_from_the_layer_visited_last_and_never_the_current_step():
    run = Decode("layer-lru", 8, [0, 1, 2])
    policy = run.policy
    run.visit(0, (0, 0))
    run.visit(1, (1, 0), (1, 1))
    run.visit(2, (2, 0))
    run.visit(0, (0, 1))  # now at layer 0: (0, 0) waits a whole cycle, (2, 0) two steps, layer 1 one
    every = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert policy.victim(every) == (0, 0)
    assert policy.victim([k for k in every if k != (0, 0)]) == (2, 0)
    assert policy.victim([(1, 0), (1, 1)]) == (1, 0)  # LRU within a layer
    policy.on_demote((1, 1))
    assert policy.victim([(1, 0), (1, 1)]) == (1, 1)  # a demoted prefetch goes first within its layer
    assert policy.victim([(0, 1)]) == (0, 1)  # the step's own key only when nothing else can go


def test_predictive_keeps_the_keys_that_earn_their_slot():
    run = Decode("predictive", 8, [0, 1], decay=0.5)
    policy = run.policy
    run.visit(0, (0, 0), (0, 1))
    run.visit(1, (1, 0))
    run.visit(0, (0, 0))
    run.visit(1, (1, 1))
    # p: (0, 0) used twice, .5 * .5 + .5 = .75; (0, 1) once, one visit ago: .25; (1, 0) .25; (1, 1) .5
    assert [policy.probability(k) for k in [(0, 0), (0, 1), (1, 0), (1, 1)]] == [0.75, 0.25, 0.25, 0.5]
    # at layer 1, layer 0 runs next (1 step), layer 1 in 2: worth (0, 1) = .25 / 1, (1, 0) = .25 / 2
    assert policy.worth((0, 1)) == 0.25 and policy.worth((1, 0)) == 0.125
    assert policy.victim([(0, 0), (0, 1), (1, 0)]) == (1, 0)
    policy.on_scores(1, [0.9, 0.0])  # the predictor: layer 1's next step will likely use expert 0
    assert policy.probability((1, 0)) == 1 - 0.1 * 0.75 and policy.victim([(0, 0), (0, 1), (1, 0)]) == (0, 1)
    policy.on_scores(0, [0.0, 0.0])  # a prediction only adds: recency-frequency still vouches for (0, 0)
    assert policy.probability((0, 0)) == 0.75
    run.visit(0, (0, 0))  # layer 0 ran: its scores are spent
    assert policy.probability((0, 1)) == 0.125


def test_predictive_takes_a_task_prior_as_evidence_that_decays():
    run = Decode("predictive", 8, [0, 1], decay=0.5)
    policy = run.policy
    run.visit(0, (0, 0))
    run.visit(1, (1, 0))
    # before decode: the task's prior for layer 0 says expert 1 (never used yet) is likely, expert 0 a little
    policy.on_prior(0, [0.2, 0.8, 0.0])
    assert policy.probability((0, 1)) == 0.8  # a key without history starts at its prior
    assert policy.probability((0, 0)) == pytest.approx(1 - 0.8 * 0.5)  # recency .5 and prior .2 combine
    assert policy.probability((0, 2)) == policy.floor
    assert policy.victim([(0, 0), (0, 1), (1, 0)]) == (1, 0)  # (0, 1) now outranks a key only recency vouches for
    run.visit(0, (0, 0))  # layer 0's first decode step does not use expert 1: its prior halves, as any value
    assert policy.probability((0, 1)) == 0.4
    assert policy.probability((0, 0)) == pytest.approx(0.6 * 0.5 + 0.5)


def test_layer_budget_evicts_within_a_layer_at_its_budget_and_from_the_most_over_one_otherwise():
    run = Decode("layer-budget", 4, [0, 1])
    policy = run.policy
    assert policy.budget == {0: 2, 1: 2}
    run.visit(0, (0, 0))
    run.visit(1, (1, 0), (1, 1), (1, 2))  # layer 1 holds 3 (free slots were there), budget 2
    every = [(0, 0), (1, 0), (1, 1), (1, 2)]
    assert policy.victim(every, incoming=(0, 1)) == (1, 0)  # layer 0 under budget: the most over gives
    assert policy.victim(every, incoming=(1, 3)) == (1, 0)  # layer 1 over budget: its own LRU
    policy.on_evict((0, 0))
    policy.on_insert((0, 0))  # a miss on the key layer 0 just evicted: it takes a slot from layer 1
    policy.on_access((0, 0), hit=False)
    assert policy.budget == {0: 3, 1: 1}


@pytest.mark.parametrize("name", ["layer-lru", "predictive", "layer-budget"])
def test_layer_aware_policies_follow_the_common_hooks(name):
    # the generic sequence with (layer, expert) keys: no errors, a candidate always comes back
    policy = make_policy(name)
    keys = [(0, 0), (0, 1), (1, 0)]
    for key in keys:
        policy.on_layer(key[0])
        policy.on_insert(key)
        policy.on_access(key, False)
    assert policy.victim(keys) in keys and policy.victim(keys[1:2]) == keys[1]
    policy.on_demote(keys[0])
    policy.on_evict(keys[0])
    assert policy.victim(keys[1:]) in keys[1:]


def test_registry():
    assert sorted(POLICIES) == ["fifo", "layer-budget", "layer-lru", "lfu", "lru", "predictive"]
    with pytest.raises(PolicyError, match="predictive needs"):
        make_policy("predictive", decay=0)
    with pytest.raises(PolicyError, match="unknown eviction policy 'mru'"):
        make_policy("mru")
