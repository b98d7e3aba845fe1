"""predictors/trace.py: predecessors by sequence, precision/recall against hand-computed numbers, the
online predict/observe order, and the simulate_prefetch adapter's exact prefetch counts."""

from __future__ import annotations

import numpy as np
import pytest

from offload.errors import ConfigError
from offload.sim.simulate import Step, simulate_prefetch
from predictors import MoEShape, Predictor, RouteContext
from predictors.evaluate import PrefetchAdapter, parse_seqs, read_trace_spec, score_trace, select_seqs, time_predict
from predictors.history import PrevToken

from .synthetic import make_trace, save, with_experts


class Constant(Predictor):
    """Always ranks experts 0 > 1 > 2 > ..."""

    name = "constant"

    def predict(self, ctx: RouteContext, lookahead: int) -> np.ndarray:
        d = min(lookahead, self.shape.num_layers - 1 - ctx.layer)
        return np.broadcast_to(-np.arange(self.shape.num_experts, dtype=np.float32),
                               (d, ctx.tokens, self.shape.num_experts)).copy()


class Oracle(Predictor):
    """Knows the trace: scores the experts the current token will use (counts tokens by observe calls)."""

    name = "oracle"

    def __init__(self, shape: MoEShape, experts: np.ndarray) -> None:
        super().__init__(shape)
        self.experts = experts
        self.token = 0
        self.log: list[tuple] = []

    def predict(self, ctx: RouteContext, lookahead: int) -> np.ndarray:
        self.log.append(("predict", self.token, ctx.layer, ctx.prev.tolist()))
        layers = range(ctx.layer + 1, min(ctx.layer + 1 + lookahead, self.shape.num_layers))
        token = self.token + (ctx.layer < 0)  # layer -1: the next token's first layers
        scores = np.zeros((len(layers), 1, self.shape.num_experts), dtype=np.float32)
        for j, layer in enumerate(layers):
            if token < len(self.experts):
                scores[j, 0, self.experts[token, layer]] = 1
        return scores

    def observe(self, experts: np.ndarray, prev: np.ndarray) -> None:
        self.log.append(("observe", self.token, experts.tolist(), prev.tolist()))
        self.token += 1


# 2 layers, 4 experts, top-2; the layer-1 routes are {0,1}, {0,2}, {3,2}
HAND = with_experts(make_trace([[[0, 1], [0, 1]], [[0, 1], [0, 2]], [[0, 1], [3, 2]]]), 4)


def test_precision_and_recall_of_a_constant_predictor_by_hand() -> None:
    s = score_trace(Constant(MoEShape(2, 4, 2)), HAND, lookahead=1)
    assert [(c.lookahead, c.k) for c in s.counts] == [(1, 2), (1, 4)]
    top, wide = s.at(1, 2), s.at(1, 4)
    # k=2 proposes {0, 1}: hits 2 + 1 + 0 = 3 of 3 predictions x 2 slots
    assert (top.predictions, top.hits, top.precision, top.recall) == (3, 3, 0.5, 0.5)
    # k=4 proposes everything: every used expert is hit (recall 1), half the proposals are used
    assert (wide.predictions, wide.hits, wide.precision, wide.recall) == (3, 6, 0.5, 1.0)
    assert s.per_layer_hits[(1, 2)].tolist() == [0, 3]
    assert s.predict_calls == 3 and s.observe_calls == 3


def test_precision_and_recall_of_prev_token_by_hand() -> None:
    # 3 layers, top-1, 3 experts; sequences 0 and 1 interleave: t0 (s0), t1 (s1), t2 (s0), t3 (s0)
    experts = [[[0], [1], [2]], [[1], [1], [1]], [[0], [1], [0]], [[2], [1], [0]]]
    trace = with_experts(make_trace(experts, seq=[0, 1, 0, 0]), 3)
    s = score_trace(PrevToken(MoEShape(3, 3, 1)), trace, lookahead=2, ks=(1,))
    # t0, t1 have no predecessor: all-zero scores pick expert 0 -> hits only where the token used 0:
    #   d=1 (layers 1, 2): t0 -> 1, 2: 0 hits; t1 -> 1, 1: 0 hits.  d=2 (layer 2): t0: 0, t1: 0.
    # t2 (prev t0 = 0,1,2): d=1 layers 1, 2: 1 hit (layer 1); d=2 layer 2: 0 hits.
    # t3 (prev t2 = 0,1,0): d=1 layers 1, 2: 2 hits; d=2 layer 2: 1 hit.
    assert (s.at(1, 1).predictions, s.at(1, 1).hits) == (8, 3)
    assert (s.at(2, 1).predictions, s.at(2, 1).hits) == (4, 1)
    assert s.at(1, 1).precision == s.at(1, 1).recall == 3 / 8


def test_score_trace_observes_each_token_after_its_predictions_with_its_predecessor() -> None:
    experts = np.array([[[0], [1]], [[1], [0]], [[1], [1]]])
    oracle = Oracle(MoEShape(2, 2, 1), experts)
    score_trace(oracle, with_experts(make_trace(experts, seq=[0, 1, 0]), 2), lookahead=1)
    unknown = [[[-1], [-1]]]
    assert oracle.log == [
        ("predict", 0, 0, unknown), ("observe", 0, [[[0], [1]]], unknown),
        ("predict", 1, 0, unknown), ("observe", 1, [[[1], [0]]], unknown),
        ("predict", 2, 0, [[[0], [1]]]), ("observe", 2, [[[1], [1]]], [[[0], [1]]]),
    ]


def test_time_predict_times_batched_contexts() -> None:
    assert 0 < time_predict(PrevToken(MoEShape(2, 4, 2)), HAND, 1, tokens=2, calls=10, repeats=2) < 1e5


def test_oracle_scores_perfectly_and_score_trace_rejects_a_foreign_shape() -> None:
    s = score_trace(Oracle(MoEShape(2, 4, 2), HAND.experts.astype(int)), HAND, lookahead=1)
    assert s.at(1, 2).precision == 1.0
    with pytest.raises(ConfigError, match="shape"):
        score_trace(Constant(MoEShape(3, 4, 2)), HAND, lookahead=1)


# One sequence, 2 layers, 4 experts, top-1: t0 = (0, 1), t1 = (2, 3), t2 = (0, 1).
# Keys: layer 0 expert e -> e, layer 1 expert e -> 4 + e; the stream is 0 5 2 7 0 5.
ORACLE_EXPERTS = np.array([[[0], [1]], [[2], [3]], [[0], [1]]])


def test_adapter_with_an_oracle_prefetches_every_next_layer_exactly() -> None:
    trace = with_experts(make_trace(ORACLE_EXPERTS), 4)
    # With room for every key: after layer 0 of t0 the oracle prefetches 5 (used at the next step),
    # t1 prefetches 7 (used), t2's 5 is still resident (not issued). Misses are the layer-0 keys 0, 2.
    adapter = PrefetchAdapter(Oracle(MoEShape(2, 4, 1), ORACLE_EXPERTS), lookahead=1, across_tokens=False)
    r = simulate_prefetch(trace, "lru", "global", 8, predictor=adapter)
    assert (r.sim.misses, r.sim.hits, r.issued, r.used, r.wasted, r.stalls) == (2, 4, 2, 2, 0, 0)
    assert adapter.calls == 3  # one predict per token: the last layer has nothing ahead within the token
    # A transfer of 2 layer steps: both used prefetches are demanded one step after issue, so they stall
    r = simulate_prefetch(trace, "lru", "global", 8, latency=2, predictor=PrefetchAdapter(
        Oracle(MoEShape(2, 4, 1), ORACLE_EXPERTS), lookahead=1, across_tokens=False))
    assert (r.issued, r.used, r.wasted, r.stalls) == (2, 2, 0, 2)


def test_adapter_looks_across_the_token_boundary() -> None:
    trace = with_experts(make_trace(ORACLE_EXPERTS), 4)
    # Now the last layer also proposes the next token's layer 0: t0 prefetches 5, then 2 (t1's layer 0); t1
    # prefetches 7; t2's 0 is still resident, t2's own proposals too. Only t0's first key misses.
    oracle = Oracle(MoEShape(2, 4, 1), ORACLE_EXPERTS)
    adapter = PrefetchAdapter(oracle, lookahead=1)
    r = simulate_prefetch(trace, "lru", "global", 8, predictor=adapter)
    assert (r.sim.misses, r.sim.hits, r.issued, r.used, r.wasted) == (1, 5, 3, 3, 0)
    assert adapter.calls == 6  # within the token after layer 0, across it after layer 1
    # the next token's context: layer -1, the current token's route as prev
    assert [entry[3] for entry in oracle.log if entry[2] == -1][:2] == [[[[0], [1]]], [[[2], [3]]]]
    # lookahead 2 on 2 layers: after layer 0 the next token's layer 0 is already in reach, prev known to layer 0
    oracle = Oracle(MoEShape(2, 4, 1), ORACLE_EXPERTS)
    simulate_prefetch(trace, "lru", "global", 8, predictor=PrefetchAdapter(oracle, lookahead=2))
    assert oracle.log[1] == ("predict", 0, -1, [[[0], [-1]]])


def test_adapter_proposes_k_experts_per_layer_for_each_layer_ahead() -> None:
    # 3 layers, top-1, 3 experts; the oracle scores the used expert 1, the rest 0: with k=2 it also
    # proposes the lowest-numbered other expert (stable ties), which is never used -> wasted.
    experts = np.array([[[0], [1], [2]], [[0], [1], [2]]])
    trace = with_experts(make_trace(experts), 3)
    seen: list[list[int]] = []

    class Spy(PrefetchAdapter):
        def __call__(self, step):
            proposal = super().__call__(step)
            seen.append(list(proposal.keys))
            return proposal

    r = simulate_prefetch(trace, "lru", "global", 9,
                          predictor=Spy(Oracle(MoEShape(3, 3, 1), experts), 2, k=2, across_tokens=False))
    # t0 layer 0: layer 1 -> experts 1, 0 (keys 4, 3); layer 2 -> 2, 0 (keys 8, 6). Layer 1: layer 2 -> 8, 6.
    assert seen[:3] == [[4, 3, 8, 6], [8, 6], []]
    # t0 issues 4, 3, 8, 6 (all new); t1 finds them resident. Used: 4 and 8; wasted: 3 and 6.
    assert (r.issued, r.used, r.wasted, r.stalls, r.sim.misses) == (4, 2, 2, 0, 1)


def test_adapter_hands_each_predicted_layer_its_probabilities() -> None:
    experts = np.array([[[0], [1], [2]]])
    adapter = PrefetchAdapter(Oracle(MoEShape(3, 3, 1), experts), 2)
    proposal = adapter(Step(0, 0, 3, experts[:0], experts[0, :1]))
    assert sorted(proposal.probs) == [1, 2]  # the layers it scored, for a prediction-aware policy
    # the oracle's scores (1 for the used expert, 0 elsewhere) through the default softmax scaled to top_k = 1
    assert np.allclose(proposal.probs[1], np.exp([0, 1, 0]) / np.exp([0, 1, 0]).sum())


def test_adapter_builds_prev_from_the_same_sequence_and_observes_online() -> None:
    experts = np.array([[[0], [1]], [[1], [0]], [[1], [1]]])
    oracle = Oracle(MoEShape(2, 2, 1), experts)
    simulate_prefetch(with_experts(make_trace(experts, seq=[0, 1, 0]), 2), "lru", "global", 4,
                      predictor=PrefetchAdapter(oracle, 1, seq=np.array([0, 1, 0]), across_tokens=False))
    assert [entry[3] for entry in oracle.log if entry[0] == "predict"] == [
        [[[-1], [-1]]], [[[-1], [-1]]], [[[0], [1]]]]
    assert [entry[1] for entry in oracle.log if entry[0] == "observe"] == [0, 1, 2]


def test_sequence_selection_and_specs(tmp_path) -> None:
    trace = with_experts(make_trace(ORACLE_EXPERTS, seq=[0, 1, 2]), 4)
    assert parse_seqs("0-2,5") == (0, 1, 2, 5)
    assert select_seqs(trace, [0, 2]).seq.tolist() == [0, 2]
    path = save(trace, tmp_path / "t.jsonl.gz")
    sub = read_trace_spec(f"{path}@1-2")
    assert sub.seq.tolist() == [1, 2] and sub.path.endswith("@1-2")
    assert len(read_trace_spec(str(path))) == 3
    with pytest.raises(ConfigError, match="no sequence 7"):
        select_seqs(trace, [7])
    with pytest.raises(ConfigError, match="bad sequence list"):
        parse_seqs("3-1")


def test_across_the_boundary_the_next_token_has_its_own_sequences_prev() -> None:
    experts = np.array([[[0], [1]], [[1], [0]], [[1], [1]]])
    oracle = Oracle(MoEShape(2, 2, 1), experts)
    simulate_prefetch(with_experts(make_trace(experts, seq=[0, 1, 0]), 2), "lru", "global", 4,
                      predictor=PrefetchAdapter(oracle, 1, seq=np.array([0, 1, 0])))
    # after t0: t1 opens sequence 1 (no prev); after t1: t2 follows t0 in sequence 0; after t2: the trace ends
    assert [entry[3] for entry in oracle.log if entry[0] == "predict" and entry[2] == -1] == [
        [[[-1], [-1]]], [[[0], [1]]]]
