"""offload/batchsim.py: loads and waits on hand-made requests equal hand-computed numbers, the access
stream agrees with the numba simulator, workloads are cut from the trace as documented, the max_wait
promise holds in the simulated loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from offload.errors import ConfigError, PolicyError
from offload.sim.batching import (
    BatchSimConfig,
    SimRequest,
    decode_sequences,
    locality,
    make_workload,
    simulate_batching,
)
from offload.sim.simulate import AccessStream, simulate
from offload.traces.format import TraceHeader, TraceWriter, read_trace

HUMANEVAL = Path(__file__).parents[2] / "data" / "mixtral-8x7b-humaneval.jsonl.gz"  # 32 layers, 8 experts, top-2


@pytest.fixture(scope="module")
def humaneval():
    return read_trace(HUMANEVAL)


def request(*steps: list[int], prefix: list[list[int]] = ()) -> SimRequest:
    """Top-1 routes, one list of experts per layer for each step."""
    routes = np.array(steps, dtype=np.int64)[:, :, None]  # [steps, layers, 1]
    before = np.array(prefix, dtype=np.int64).reshape(len(prefix), routes.shape[1], 1)
    return SimRequest(routes, before, (0, 0))


# Two layers of two experts, top-1; key = layer * 2 + expert.
#   request 0: step 0 experts (0, 1) -> keys 0, 3;   step 1 (0, 0) -> keys 0, 2
#   request 1: step 0 experts (1, 1) -> keys 1, 3;   step 1 (0, 1) -> keys 0, 3
HAND = [request([0, 1], [0, 0]), request([1, 1], [0, 1])]


def test_loads_of_one_batch_by_hand() -> None:
    # batch 2, global LRU of 3 keys. Step 0 runs layer 0's experts {0, 1} and layer 1's {1}:
    #   0 miss, 1 miss, 3 miss.  Step 1: layer 0 {0}, layer 1 {0, 1}: 0 hit, 2 miss (evicts 1), 3 hit
    keys: list[int] = []
    r = simulate_batching(HAND, BatchSimConfig("fifo", batch_size=2, capacity=3), num_experts=2, keys_out=keys)
    assert keys == [0, 1, 3, 0, 2, 3]
    assert (r.tokens, r.steps, r.accesses, r.loads) == (4, 2, 6, 4)
    assert r.distinct_per_layer == 1.5  # step 0: 2 and 1; step 1: 1 and 2
    assert (r.loads_per_token, r.tokens_per_step, r.wait_max, r.mean_latency) == (1.0, 2.0, 0, 2.0)


def test_loads_one_request_at_a_time_by_hand() -> None:
    # batch 1, fifo: request 0 runs twice, then request 1 (which waited 2 steps).  LRU of 3:
    #   0 m, 3 m, 0 h, 2 m | 1 m (evicts 3), 3 m (evicts 0), 0 m (evicts 2), 3 h    -> 6 loads
    keys: list[int] = []
    r = simulate_batching(HAND, BatchSimConfig("fifo", batch_size=1, capacity=3), num_experts=2, keys_out=keys)
    assert keys == [0, 3, 0, 2, 1, 3, 0, 3]
    assert (r.tokens, r.steps, r.accesses, r.loads, r.wait_max) == (4, 4, 8, 6, 2)
    assert r.distinct_per_layer == 1.0 and r.mean_latency == 3.0  # finished at steps 2 and 4


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
@pytest.mark.parametrize("scheduler", ["fifo", "expert-aware"])
def test_loads_equal_the_numba_simulator(humaneval, policy, scheduler) -> None:
    """The sim's cache is the simulator's Python twin: its loads are simulate()'s misses on the same stream."""
    workload = make_workload(humaneval, 12, seed=3)
    keys: list[int] = []
    config = BatchSimConfig(scheduler, batch_size=4, capacity=64, policy=policy)
    r = simulate_batching(workload, config, num_experts=8, keys_out=keys)
    stream = AccessStream(np.array(keys, dtype=np.int32), 1, 32 * 8, 1)  # one "layer" of all 256 keys
    assert r.accesses == len(keys)
    assert r.loads == simulate(stream, policy, "global", 64).misses
    assert r.tokens == sum(w.steps for w in workload)


def test_expert_aware_keeps_the_max_wait_promise_and_groups(humaneval) -> None:
    workload = make_workload(humaneval, 24, seed=1)
    fifo = simulate_batching(workload, BatchSimConfig("fifo", batch_size=4, capacity=64), num_experts=8)
    aware = simulate_batching(workload, BatchSimConfig("expert-aware", batch_size=4, max_wait=3, capacity=64),
                              num_experts=8)
    assert aware.wait_max <= 3 < fifo.wait_max  # the pool of 2 x batch keeps within 4 x (3 + 1)
    assert aware.tokens == fifo.tokens
    assert aware.distinct_per_layer < fifo.distinct_per_layer


def test_arrivals_spread_the_requests(humaneval) -> None:
    workload = make_workload(humaneval, 8, seed=0)
    at_once = simulate_batching(workload, BatchSimConfig("fifo", batch_size=4, capacity=64), num_experts=8)
    slow = simulate_batching(workload, BatchSimConfig("fifo", batch_size=4, capacity=64, arrival_rate=0.01),
                             num_experts=8)
    assert slow.tokens == at_once.tokens
    assert slow.tokens_per_step < at_once.tokens_per_step  # one request at a time, mostly


def _write(path: Path) -> Path:
    header = TraceHeader("hand", num_layers=1, num_experts=4, top_k=1)
    with TraceWriter(path, header) as w:
        for seq, phase, expert in [(0, "prefill", 3), (0, "decode", 0), (0, "decode", 1), (0, "decode", 2),
                                   (1, "prefill", 1), (2, "decode", 2), (2, "decode", 3)]:
            w.write(seq, 0, phase, [[expert]], [[1.0]])
    return path


def test_workload_is_cut_from_the_decode_tokens(tmp_path) -> None:
    trace = read_trace(_write(tmp_path / "t.jsonl"))
    seqs = decode_sequences(trace)
    assert sorted(seqs) == [0, 2]  # seq 1 has no decode tokens
    assert seqs[0][0].ravel().tolist() == [3] and seqs[0][1].ravel().tolist() == [0, 1, 2]
    workload = make_workload(trace, 50, seed=0, min_tokens=2)
    assert [w.source for w in workload] == [w.source for w in make_workload(trace, 50, seed=0, min_tokens=2)]
    for w in workload:
        seq, offset = w.source
        prefill, decode = seqs[seq]
        assert w.routes.ravel().tolist() == decode[offset:].ravel().tolist() and w.steps >= 2
        assert w.prefix.ravel().tolist() == np.concatenate([prefill, decode[:offset]]).ravel().tolist()
    assert {w.source for w in workload} == {(0, 0), (0, 1), (2, 0)}
    assert [w.prior for w in workload if w.source == (0, 1)][0].tolist() == [[0]]
    assert [w.source for w in make_workload(trace, 0)] == [(0, 0), (2, 0)]  # every sequence once, whole
    relabelled = make_workload(trace, 0, relabel=True)  # seq 2 has an empty prefix
    assert [w.prefix.shape for w in relabelled] == [(1, 1, 1), (0, 1, 1)] and relabelled[1].routes.shape == (2, 1, 1)


def test_relabelling_permutes_each_request_per_layer(humaneval) -> None:
    trace = humaneval
    plain, relabelled = make_workload(trace, 10, seed=2), make_workload(trace, 10, seed=2, relabel=True)
    for a, b in zip(plain, relabelled):
        assert a.source == b.source and a.routes.shape == b.routes.shape and a.prefix.shape == b.prefix.shape
        whole_a, whole_b = np.concatenate([a.prefix, a.routes]), np.concatenate([b.prefix, b.routes])
        for layer in range(trace.header.num_layers):
            pairs = set(zip(whole_a[:, layer].ravel().tolist(), whole_b[:, layer].ravel().tolist()))
            assert len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})  # a bijection


@pytest.mark.parametrize("kwargs, error", [
    ({"scheduler": "random"}, ConfigError), ({"policy": "belady"}, ConfigError), ({"policy": "mru"}, PolicyError),
    ({"admission": "sorted"}, ConfigError), ({"prediction": "magic"}, ConfigError), ({"capacity": 0}, ConfigError),
])
def test_bad_configs(kwargs, error) -> None:
    with pytest.raises(error):
        BatchSimConfig(**kwargs)


def test_locality_by_hand(tmp_path) -> None:
    trace = read_trace(_write(tmp_path / "t.jsonl"))  # decode experts: seq 0: 0, 1, 2; seq 2: 2, 3 (top-1)
    stats = locality(trace, pairs=500)
    assert stats["prev_token"] == 0.0 and stats["same_seq"] == 0.0 and stats["chance"] == 0.25
    assert 0.0 < stats["other_seq"] < 1.0  # only expert 2 is shared: seq 0's last token and seq 2's first


def test_locality_of_humaneval(humaneval) -> None:
    stats = locality(humaneval)
    assert stats["chance"] == 0.25
    assert stats["prev_token"] > stats["same_seq"] > stats["chance"]  # consecutive tokens share the most experts
