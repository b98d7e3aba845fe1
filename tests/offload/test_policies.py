"""offload/policies.py: each policy's victim on hand-made sequences, demotion, and the registry."""

from __future__ import annotations

import pytest

from offload.errors import PolicyError
from offload.policies import POLICIES, make_policy


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


def test_registry():
    assert sorted(POLICIES) == ["fifo", "lfu", "lru"]
    with pytest.raises(PolicyError, match="unknown eviction policy 'mru'"):
        make_policy("mru")
