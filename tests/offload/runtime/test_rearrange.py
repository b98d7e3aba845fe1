"""offload/runtime/rearrange.py: fifo order, expert-aware picks on hand-made routes and against brute force,
bounded unfairness under adversarial routes, admission order, distinct_experts, the registry."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.errors import ConfigError
from offload.runtime.rearrange import (
    SCHEDULERS,
    ExpertAware,
    Request,
    admission_order,
    distinct_experts,
    make_scheduler,
)


def one_layer(*experts: tuple[int, ...] | None) -> list[Request]:
    """Requests whose predicted route is one layer of the given experts (None: unknown)."""
    return [Request(i, None if e is None else np.array([e])) for i, e in enumerate(experts)]


def ids(picked: list[Request]) -> list[int]:
    return [r.id for r in picked]


def union(batch: list[Request]) -> int:
    """Distinct (layer, expert) keys of a batch: the number expert-aware minimises."""
    return int(distinct_experts([r.route for r in batch]).sum())


# ------------------------------------------------------------------------------------ distinct_experts


def test_distinct_experts_counts_per_layer() -> None:
    a = np.array([[0, 1], [2, 3], [5, 6]])
    b = np.array([[1, 0], [2, 4], [7, 5]])
    assert distinct_experts([a, b]).tolist() == [2, 3, 3]
    assert distinct_experts([a]).tolist() == [2, 2, 2]
    assert distinct_experts([a, a, a]).tolist() == [2, 2, 2]
    assert distinct_experts([]).tolist() == []


def test_distinct_experts_refuses_mixed_shapes() -> None:
    with pytest.raises(ConfigError, match="shape"):
        distinct_experts([np.zeros((2, 2), dtype=int), np.zeros((3, 2), dtype=int)])


# ---------------------------------------------------------------------------------------- registry


def test_unknown_scheduler_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown scheduler 'random'") as info:
        make_scheduler("random", 4)
    assert info.value.hint == "use one of: expert-aware, fifo"
    assert set(SCHEDULERS) == {"fifo", "expert-aware"}


@pytest.mark.parametrize("batch_size, max_wait", [(0, 4), (-1, 4), (2, -1), (2.5, 4), (True, 4)])
def test_bad_sizes(batch_size, max_wait) -> None:
    with pytest.raises(ConfigError):
        make_scheduler("fifo", batch_size, max_wait)


def test_step_done_resets_the_picked_and_ages_the_rest() -> None:
    ready = one_layer((0, 1), (2, 3), (4, 5))
    ready[0].waited, ready[1].waited = 3, 1
    make_scheduler("fifo", 1).step_done(ready, [ready[1]])
    assert [r.waited for r in ready] == [4, 0, 1]


# -------------------------------------------------------------------------------------------- fifo


def test_fifo_takes_arrival_order() -> None:
    ready = one_layer((0, 1), (2, 3), (0, 1), (4, 5), (0, 1))
    assert ids(make_scheduler("fifo", 3).pick(ready, resident=[(0, 4)])) == [0, 1, 2]
    assert ids(make_scheduler("fifo", 8).pick(ready)) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------ expert-aware


def test_expert_aware_groups_overlapping_routes() -> None:
    # fifo takes 0 and 1 (4 experts); 0 and 2 share both experts
    ready = one_layer((0, 1), (2, 3), (1, 0), (4, 5))
    assert ids(make_scheduler("expert-aware", 2).pick(ready)) == [0, 2]
    # three of four: 0, 2, then 1 and 3 add two each; the tie goes to the earlier, 1
    assert ids(make_scheduler("expert-aware", 3).pick(ready)) == [0, 1, 2]


def test_expert_aware_on_two_layers() -> None:
    routes = [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[0, 1], [3, 6]], [[1, 0], [2, 3]]]
    ready = [Request(i, np.array(r)) for i, r in enumerate(routes)]
    picked = make_scheduler("expert-aware", 2).pick(ready)
    assert ids(picked) == [0, 3] and distinct_experts([r.route for r in picked]).tolist() == [2, 2]


def test_cached_keys_count_less() -> None:
    ready = one_layer((0, 1), (2, 3), (4, 5))
    cached = [(0, 4), (0, 5)]
    # 2 (0.5 + 0.5 for the cached pair) is cheapest, then 0 and 1 tie and the earlier wins
    assert ids(ExpertAware(2, resident_weight=0.5).pick(ready, cached)) == [0, 2]
    # at weight 1 the cache does not matter: every pair costs 4, and the arrival order is kept
    assert ids(ExpertAware(2, resident_weight=1.0).pick(ready, cached)) == [0, 1]


def test_unknown_route_counts_as_the_mean() -> None:
    ready = one_layer((0, 1), None, (1, 0), (2, 3))
    assert ids(make_scheduler("expert-aware", 2).pick(ready)) == [0, 2]  # 2 adds 0, the unknown 1 adds 2
    ready = one_layer(None, None, None)
    assert ids(make_scheduler("expert-aware", 2).pick(ready)) == [0, 1]


def test_waited_requests_go_first() -> None:
    ready = one_layer((0, 1), (2, 3), (1, 0), (6, 7))
    ready[3].waited = 4  # at max_wait: must run now, however little it shares
    assert ids(make_scheduler("expert-aware", 2, max_wait=4).pick(ready)) == [0, 3]


routes_strategy = st.lists(
    st.lists(st.lists(st.integers(0, 3), min_size=2, max_size=2, unique=True), min_size=2, max_size=2),
    min_size=1, max_size=7)


@settings(max_examples=150, deadline=None)
@given(routes=routes_strategy, batch_size=st.integers(1, 4))
def test_greedy_against_brute_force(routes, batch_size) -> None:
    """Greedy is no optimum, but it is never worse than fifo's batch, and never better than the best."""
    ready = [Request(i, np.array(r)) for i, r in enumerate(routes)]
    picked = make_scheduler("expert-aware", batch_size).pick(ready)
    n = min(batch_size, len(ready))
    assert len(picked) == n and len(set(ids(picked))) == n
    assert ids(picked) == sorted(ids(picked))  # handed back in arrival order
    best = min(union(list(c)) for c in combinations(ready, n))
    assert best <= union(picked) <= union(ready[:n])


def _run_until(ready: list[Request], scheduler, steps: int, rng: np.random.Generator, adversary: int) -> int:
    """Decode ``steps`` steps with fresh random routes each step; the longest wait seen."""
    layers = ready[0].route.shape[0]
    longest = 0
    for _ in range(steps):
        for r in ready:  # experts 0..3 for everyone, 7 for the adversary: it never overlaps
            r.route = np.array([[7]] * layers) if r.id == adversary else rng.integers(0, 4, size=(layers, 1))
        cached = [(int(layer), int(e)) for layer, e in rng.integers(0, 4, size=(3, 2))]
        picked = scheduler.pick(ready, cached)
        assert 1 <= len(picked) <= scheduler.batch_size
        scheduler.step_done(ready, picked)
        longest = max(longest, max(r.waited for r in ready))
    return longest


@settings(max_examples=60, deadline=None)
@given(batch_size=st.integers(1, 4), max_wait=st.integers(0, 4), fill=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_nobody_waits_more_than_max_wait(batch_size, max_wait, fill, seed) -> None:
    """With at most batch_size * (max_wait + 1) ready, every request runs within max_wait skipped steps."""
    n = 1 + round(fill * (batch_size * (max_wait + 1) - 1))
    rng = np.random.default_rng(seed)
    ready = [Request(i, np.zeros((2, 1), dtype=int)) for i in range(n)]
    assert _run_until(ready, make_scheduler("expert-aware", batch_size, max_wait), 30, rng, adversary=n - 1) <= max_wait


def test_overfull_pool_degrades_to_oldest_first() -> None:
    """Past the bound no promise holds, but the oldest always runs: nobody starves."""
    rng = np.random.default_rng(0)
    ready = [Request(i, np.zeros((2, 1), dtype=int)) for i in range(12)]
    scheduler = make_scheduler("expert-aware", 2, max_wait=1)  # room for 4 within the bound, 12 ready
    assert _run_until(ready, scheduler, 40, rng, adversary=11) == 12 // 2 - 1  # round robin


# --------------------------------------------------------------------------------------- admission


def test_admission_chains_similar_prompts() -> None:
    a = np.array([[0, 1], [0, 1], [1, 0]])  # [tokens, top_k]: experts 0 and 1
    b = np.array([[4, 5], [5, 6]])
    assert admission_order([a, b, a[:2], b[:1], np.array([[0, 2]])]) == [0, 2, 4, 1, 3]


def test_admission_accepts_all_layers_and_empty_prompts() -> None:
    a = np.array([[[0, 1], [2, 3]]])  # [tokens, layers, top_k]
    b = np.array([[[0, 1], [4, 5]]])
    empty = np.zeros((0, 2, 2), dtype=int)
    assert admission_order([a, empty, b, a]) == [0, 3, 2, 1]
    with pytest.raises(ConfigError, match="prompt routes"):
        admission_order([a, np.array([[0, 1]]), b])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.lists(st.integers(0, 7), min_size=2, max_size=2, unique=True), max_size=5),
                max_size=12))
def test_admission_order_is_a_permutation(prompts) -> None:
    routes = [np.array(p, dtype=np.int64).reshape(len(p), 2) for p in prompts]
    assert sorted(admission_order(routes)) == list(range(len(prompts)))
