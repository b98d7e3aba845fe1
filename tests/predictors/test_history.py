"""predictors/history.py: prev-token's exact scores, markov's counts and scores on hand-made routes,
online updates, batched contexts with unknown predecessors."""

from __future__ import annotations

import numpy as np
import pytest

from offload.errors import ConfigError
from predictors import MoEShape, RouteContext, make_predictor, top_candidates
from predictors.history import Markov, PrevToken

from .synthetic import make_trace, with_experts

SHAPE = MoEShape(num_layers=3, num_experts=4, top_k=2)
UNKNOWN = np.full((1, 3, 2), -1)


def ctx(layer: int, path, prev) -> RouteContext:
    return RouteContext(layer, np.asarray(path), np.asarray(prev))


def test_prev_token_scores_exactly_the_previous_route() -> None:
    prev = [[[1, 2], [3, 0], [2, 1]]]
    scores = PrevToken(SHAPE).predict(ctx(0, [[[1, 2]]], prev), 2)
    # layer 1 gets prev's [3, 0] (top-1 scores 2, top-2 scores 1), layer 2 gets [2, 1]
    assert scores.tolist() == [[[1, 0, 0, 2]], [[0, 1, 2, 0]]]
    assert top_candidates(scores[:, 0], 2).tolist() == [[3, 0], [2, 1]]


def test_prev_token_without_predecessor_is_all_zero_and_lookahead_stops_at_the_last_layer() -> None:
    p = PrevToken(SHAPE)
    prev = np.stack([UNKNOWN[0], [[1, 2], [3, 0], [2, 1]]])  # two tokens: unknown, known
    scores = p.predict(ctx(1, [[[0, 1], [0, 1]], [[1, 2], [3, 0]]], prev), 5)
    assert scores.shape == (1, 2, 4)  # only layer 2 is left
    assert scores[0, 0].tolist() == [0, 0, 0, 0] and scores[0, 1].tolist() == [0, 1, 2, 0]
    assert p.predict(ctx(2, np.zeros((2, 3, 2), int), prev), 1).shape == (0, 2, 4)
    with pytest.raises(ConfigError, match="lookahead"):
        p.predict(ctx(0, [[[0, 1]]], UNKNOWN), 0)


# One sequence, 2 layers, 3 experts, top-1:  t0 = (0, 1), t1 = (0, 1), t2 = (2, 0)
HAND = with_experts(make_trace([[[0], [1]], [[0], [1]], [[2], [0]]]), 3)
HAND_SHAPE = MoEShape(2, 3, 1)


def test_markov_counts_on_a_hand_made_trace() -> None:
    m = Markov(HAND_SHAPE, HAND)
    assert m.tokens == 3 and m.horizon == 1
    assert m.unigram.tolist() == [[2, 0, 1], [1, 2, 0]]
    assert m.pair[0, 0].tolist() == [[0, 2, 0], [0, 0, 0], [1, 0, 0]]  # 0 -> 1 twice, 2 -> 0 once
    # predecessor -> token at the same layer: layer 0: 0 -> 0 (t1), 0 -> 2 (t2); layer 1: 1 -> 1, 1 -> 0
    assert m.temporal[0].tolist() == [[1, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert m.temporal[1].tolist() == [[0, 0, 0], [1, 1, 0], [0, 0, 0]]


def test_markov_score_with_one_feature_is_the_smoothed_conditional() -> None:
    # With only the path feature (no predecessor), naive Bayes leaves log p(b at 1 | 0 at 0):
    # (count + alpha * k / E) / (count(0 at 0) + alpha) = ([0, 2, 0] + 1/3) / 3
    scores = Markov(HAND_SHAPE, HAND).predict(ctx(0, [[[0]]], [[[-1], [-1]]]), 1)
    np.testing.assert_allclose(scores[0, 0], np.log(np.array([1, 7, 1]) / 9), rtol=1e-6)


def test_markov_prev_feature_adds_the_log_ratio() -> None:
    # path 0 at layer 0, predecessor used 1 at layer 1. prior p1 = ([1, 2, 0] + 1/3) / 4;
    # p(b | prev 1) = ([1, 1, 0] + 1/3) / (2 + 1); score = log p(b | path) + log p(b | prev) - log p1(b)
    scores = Markov(HAND_SHAPE, HAND).predict(ctx(0, [[[0]]], [[[0], [1]]]), 1)[0, 0]
    path_term = np.log(np.array([1, 7, 1]) / 9)
    prev_term = np.log(np.array([4, 4, 1]) / 9)
    prior = np.log(np.array([4, 7, 1]) / 12)
    np.testing.assert_allclose(scores, path_term + prev_term - prior, rtol=1e-6)


def test_markov_online_update_changes_the_prediction() -> None:
    m = Markov(HAND_SHAPE, HAND)
    context = ctx(0, [[[0]]], [[[-1], [-1]]])
    assert top_candidates(m.predict(context, 1)[0], 1).tolist() == [[1]]
    for _ in range(3):  # three tokens route 0 -> 2: now 2 follows 0 more often than 1 does
        m.observe(np.array([[[0], [2]]]), np.array([[[-1], [-1]]]))
    assert m.tokens == 6 and m.pair[0, 0, 0].tolist() == [0, 2, 3]
    assert top_candidates(m.predict(context, 1)[0], 1).tolist() == [[2]]


def test_markov_uses_direct_counts_per_distance_and_only_the_prior_past_the_horizon() -> None:
    rng = np.random.default_rng(0)
    experts = np.stack([np.stack([rng.permutation(4)[:2] for _ in range(3)]) for _ in range(30)])
    trace = with_experts(make_trace(experts), 4)
    near = Markov(SHAPE, trace, horizon=1)
    assert near.pair.shape == (3, 1, 4, 4)
    two = Markov(SHAPE, trace, horizon=2)
    # layer 0 -> 2 counts are direct: every token adds its 2 x 2 (a at 0, b at 2) pairs
    assert two.pair[0, 1].sum() == 30 * 4
    c = ctx(0, experts[:1, :1], UNKNOWN)
    without_path = Markov(SHAPE, trace, horizon=1, path_weight=0).predict(c, 2)
    np.testing.assert_allclose(near.predict(c, 2)[1], without_path[1])  # layer 2 is 2 away: past the horizon
    assert not np.allclose(two.predict(c, 2)[1], without_path[1])


@pytest.mark.parametrize("name", ["prev-token", "markov"])
def test_batched_context_equals_one_token_at_a_time(name: str) -> None:
    rng = np.random.default_rng(1)
    experts = np.stack([np.stack([rng.permutation(4)[:2] for _ in range(3)]) for _ in range(20)])
    p = make_predictor(name, SHAPE)
    if name == "markov":
        p.fit(with_experts(make_trace(experts), 4))
    path = experts[:5, :2]
    prev = experts[5:10].astype(np.int64)
    prev[[1, 3]] = -1  # prefill tokens whose predecessor routes in the same step
    batched = p.predict(ctx(1, path, prev), 2)
    singles = np.concatenate([p.predict(ctx(1, path[t:t + 1], prev[t:t + 1]), 2) for t in range(5)], axis=1)
    np.testing.assert_allclose(batched, singles, rtol=1e-6)


def test_markov_rejects_bad_options_and_traces_of_another_shape() -> None:
    with pytest.raises(ConfigError, match="markov options"):
        Markov(SHAPE, horizon=0)
    with pytest.raises(ConfigError, match="shape"):
        Markov(SHAPE, HAND)


def test_markov_features_are_the_terms_predict_weighs() -> None:
    m = Markov(HAND_SHAPE, HAND, prev_weight=0.5, path_weight=2.0)
    f = m.features(ctx(0, [[[0]]], [[[0], [1]]]), 1)  # [d, tokens, experts, 2 + context]
    assert f.shape == (1, 1, 3, 2 + 3)
    prior = np.log(np.array([4, 7, 1]) / 12)
    np.testing.assert_allclose(f[0, 0, :, 0], prior, rtol=1e-6)  # the log prior
    np.testing.assert_allclose(f[0, 0, :, 1], np.log(np.array([4, 4, 1]) / 9) - prior, rtol=1e-6)  # prev ratio
    np.testing.assert_allclose(f[0, 0, :, 2], np.log(np.array([1, 7, 1]) / 9) - prior, rtol=1e-6)  # layer 0's
    assert (f[0, 0, :, 3:] == 0).all()  # no layers before 0
    np.testing.assert_allclose(m.predict(ctx(0, [[[0]]], [[[0], [1]]]), 1)[0, 0],
                               f[0, 0] @ np.array([1, 0.5, 2, 2, 2]), rtol=1e-6)


def test_markov_scores_the_next_token_from_its_predecessor_alone() -> None:
    m = Markov(HAND_SHAPE, HAND)
    scores = m.predict(RouteContext(-1, np.zeros((1, 0, 1), int), np.array([[[0], [-1]]])), 2)
    assert scores.shape == (2, 1, 3)
    # layer 0: prior + (log p(b | predecessor 0) - prior) = log p(b | predecessor 0), and 0 was followed by 0
    # once and by 2 once: ([1, 0, 1] + 1/3) / 3; layer 1 (its predecessor unknown there): the prior alone
    np.testing.assert_allclose(scores[0, 0], np.log(np.array([4, 1, 4]) / 9), rtol=1e-6)
    np.testing.assert_allclose(scores[1, 0], np.log(np.array([4, 7, 1]) / 12), rtol=1e-6)
