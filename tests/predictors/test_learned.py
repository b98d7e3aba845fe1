"""predictors/learned.py: learns a trivially learnable routing, starts from markov's ranking and learns
online through its markov counts, cross-fits markov's terms, round-trips through safetensors exactly
(format 1 files still load), and every bad weights file is a one-line ConfigError naming it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from offload.errors import ConfigError
from predictors import MoEShape, RouteContext, make_predictor
from predictors.base import prev_routes
from predictors.evaluate import score_trace, shape_of
from predictors.history import Markov
from predictors.learned import (
    Learned,
    PathMLP,
    TrainConfig,
    load_weights,
    markov_terms,
    path_data,
    save_weights,
    train,
)

from .synthetic import copy_chain

# Small enough to train in about a second on 2 cores.
QUICK = TrainConfig(lookahead=2, hidden=16, steps=150, lr=0.03, eval_every=10, seed=0)


@pytest.fixture(scope="module")
def trained():
    trace = copy_chain(tokens=200, layers=4, num_experts=6, seed=0)
    net, report = train([trace], QUICK)
    return trace, net, report


def test_learns_a_copy_chain(trained) -> None:
    trace, net, report = trained
    test = copy_chain(tokens=100, layers=4, num_experts=6, seed=1)
    s = score_trace(Learned(shape_of(trace), net=net), test, lookahead=2)
    # layer l+j repeats layer 0's expert, which the path shows: the top-1 guess should be right
    assert s.at(1, 1).precision > 0.95 and s.at(2, 1).precision > 0.95
    assert report.val_loss < report.curve[0][2]  # it learned something on held-out tokens too
    assert report.train_tokens == 160 and report.val_tokens == 40  # the last 20% of the tokens validate


def test_training_is_seeded(trained) -> None:
    trace, net, _ = trained
    again, _ = train([trace], QUICK)
    for name in ("w_path", "w_out"):
        assert torch.equal(getattr(net, name), getattr(again, name))


def test_save_load_round_trip_gives_identical_predictions(trained, tmp_path) -> None:
    trace, net, _ = trained
    path = tmp_path / "p.safetensors"
    save_weights(net, path, {"note": "test"})
    shape = shape_of(trace)
    loaded = make_predictor("learned", shape, weights=path)
    direct = Learned(shape, net=net)
    rng = np.random.default_rng(0)
    for layer in range(3):
        path_ids = rng.integers(0, 6, size=(5, layer + 1, 1))
        prev = rng.integers(-1, 6, size=(5, 4, 1))
        prev[prev < 0] = -1
        ctx = RouteContext(layer, path_ids, prev)
        np.testing.assert_array_equal(loaded.predict(ctx, 2), direct.predict(ctx, 2))


def test_numpy_inference_matches_the_torch_forward(trained) -> None:
    trace, net, _ = trained
    data = path_data([trace], 2)
    experts = trace.experts.astype(np.int64)
    prev = np.full((3, 4, 1), -1)  # the first 3 tokens open their sequences (copy_chain interleaves 4)
    feats = torch.zeros(3, 4, 2, 6, net.features)  # markov's terms from the net's own counts
    for layer in range(3):
        f = net.markov.features(RouteContext(layer, experts[:3, :layer + 1], prev), 2)  # [d, 3, E, F]
        feats[:, layer, :f.shape[0]] = torch.from_numpy(f.transpose(1, 0, 2, 3)).float()
    with torch.no_grad():
        logits = net(data.path_hot[:3], data.prev_hot[:3], feats).numpy()  # [3, L, J, E]
    p = Learned(shape_of(trace), net=net)
    for layer in range(3):
        got = p.predict(RouteContext(layer, experts[:3, :layer + 1], prev), 2)  # [d, 3, E]
        want = logits[:, layer, :got.shape[0]].transpose(1, 0, 2)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # float32 einsum vs matmul order


def test_lookahead_past_training_falls_back_to_prev_token(trained) -> None:
    trace, net, _ = trained
    p = Learned(shape_of(trace), net=net)
    prev = np.array([[[1], [2], [3], [4]]])
    scores = p.predict(RouteContext(0, np.array([[[0]]]), prev), 3)
    assert scores.shape == (3, 1, 6) and scores[2, 0].tolist() == [0, 0, 0, 0, 1, 0]


def test_untrained_it_ranks_exactly_as_markov_and_it_learns_online_through_its_counts() -> None:
    trace = copy_chain(tokens=60, layers=4, num_experts=6, seed=2)
    shape = shape_of(trace)
    net = PathMLP(shape, 2, hidden=4, features=2 + 8)  # w_feat = 1, zero MLP output: markov's naive Bayes
    net.markov = Markov(shape, trace, context=8, horizon=8)
    reference = Markov(shape, trace, context=8, horizon=8)
    learned = Learned(shape, net=net)
    experts = trace.experts.astype(np.int64)
    prev = prev_routes(trace.seq, experts)
    for layer in range(3):
        ctx = RouteContext(layer, experts[:5, :layer + 1], prev[:5])
        np.testing.assert_allclose(learned.predict(ctx, 2), reference.predict(ctx, 2), rtol=1e-5, atol=1e-5)
    learned.observe(experts[:2], prev[:2])
    assert learned.markov.tokens == 62 and net.markov.tokens == 60  # its own copy learns, the net's stays


def test_a_task_prior_replaces_the_log_prior_term_of_markov_and_of_learned_on_its_terms() -> None:
    trace = copy_chain(tokens=60, layers=4, num_experts=6, seed=2)
    shape = shape_of(trace)
    net = PathMLP(shape, 2, hidden=4, features=2 + 8)
    net.markov = Markov(shape, trace, context=8, horizon=8)
    learned, markov = Learned(shape, net=net), Markov(shape, trace, context=8, horizon=8)
    experts = trace.experts.astype(np.int64)
    prev = prev_routes(trace.seq, experts)
    ctx = RouteContext(1, experts[:5, :2], prev[:5])
    before = markov.features(ctx, 2)
    prior = np.full((4, 6), 0.05)
    prior[:, 3] = 0.9  # the task routes nearly every token to expert 3
    markov.set_prior(prior)
    learned.set_prior(prior)
    after = markov.features(ctx, 2)
    np.testing.assert_allclose(after[..., 0], np.log(prior[2:4])[:, None, :].repeat(5, axis=1))  # layers 2, 3
    np.testing.assert_array_equal(after[..., 1:], before[..., 1:])  # the evidence terms are the counts' own
    np.testing.assert_allclose(learned.predict(ctx, 2), markov.predict(ctx, 2), rtol=1e-5, atol=1e-5)
    # the score moves by exactly the change of the prior term (its weight is 1): expert 3 gains, the others lose
    delta = markov.predict(ctx, 2) - before @ np.array([1.0, markov.prev_weight] + [markov.path_weight] * 8)
    np.testing.assert_allclose(delta, after[..., 0] - before[..., 0], rtol=1e-5, atol=1e-5)
    assert (delta[..., 3] > 0).all() and (np.delete(delta, 3, axis=-1) < 0).all()
    markov.set_prior(None)
    np.testing.assert_array_equal(markov.features(ctx, 2), before)
    with pytest.raises(ConfigError, match="prior must be"):
        markov.set_prior(np.ones((3, 6)))


def test_markov_terms_of_a_fold_come_from_the_other_folds() -> None:
    trace = copy_chain(tokens=40, layers=3, num_experts=4, seed=3, seqs=4)
    terms = markov_terms([trace], 1, {"context": 2, "horizon": 2}, folds=2)  # folds: sequences {0, 2}, {1, 3}
    assert terms.shape == (40, 3, 1, 4, 4)
    experts = trace.experts.astype(np.int64)
    prev = prev_routes(trace.seq, experts)
    other = np.isin(trace.seq, [1, 3])
    markov = Markov(shape_of(trace), context=2, horizon=2)
    markov.observe(experts[other], prev[other])  # token 0 (sequence 0) is scored by the markov of sequences 1, 3
    want = markov.features(RouteContext(0, experts[:1, :1], prev[:1]), 1)[0, 0]
    np.testing.assert_allclose(terms[0, 0, 0], want, rtol=1e-6)


def test_format_1_weights_without_markov_still_load(tmp_path) -> None:
    trace = copy_chain(tokens=60, layers=4, num_experts=6, seed=4)
    net, _ = train([trace], TrainConfig(lookahead=2, hidden=4, steps=5, markov=False))
    assert net.features == 0 and net.markov is None
    path = tmp_path / "v1.safetensors"
    meta = {**net.metadata(), "format": "offload-learned-predictor/1"}
    del meta["features"]
    save_file({k: getattr(net, k).detach().contiguous() for k in ("w_path", "w_prev", "b_hidden", "w_out", "b_out")},
              str(path), metadata={"offload_predictor": json.dumps(meta)})
    loaded = make_predictor("learned", shape_of(trace), weights=path)
    assert loaded.markov is None
    ctx = RouteContext(1, trace.experts[:2, :2].astype(np.int64), np.full((2, 4, 1), -1))
    np.testing.assert_array_equal(loaded.predict(ctx, 2), Learned(shape_of(trace), net=net).predict(ctx, 2))


def test_bad_weights_files_are_one_line_config_errors(trained, tmp_path) -> None:
    trace, net, _ = trained
    shape = shape_of(trace)
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ConfigError, match="missing.safetensors: no such"):
        make_predictor("learned", shape, weights=missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ConfigError, match="garbage.safetensors: not a learned-predictor"):
        load_weights(garbage, shape)
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(ConfigError, match="bare.safetensors: metadata lacks"):
        load_weights(bare, shape)
    good = tmp_path / "good.safetensors"
    save_weights(net, good)
    with pytest.raises(ConfigError, match=r"good.safetensors: weights are for 4 layers x 6 experts top-1") as e:
        load_weights(good, MoEShape(32, 8, 2))
    assert "\n" not in str(e.value)
    other = tmp_path / "other.safetensors"
    small = PathMLP(shape, 2, hidden=4)
    tensors = {k: getattr(small, k).detach() for k in ("w_path", "w_prev", "b_hidden", "w_out")}
    save_file({**tensors, "b_out": torch.zeros(1)}, str(other),
              metadata={"offload_predictor": json.dumps(small.metadata())})
    with pytest.raises(ConfigError, match="other.safetensors: tensor b_out has shape"):
        load_weights(other, shape)


def test_learned_needs_weights_and_unknown_names_list_the_known_ones() -> None:
    shape = MoEShape(4, 6, 1)
    with pytest.raises(ConfigError, match="needs weights=PATH"):
        make_predictor("learned", shape)
    with pytest.raises(ConfigError, match="unknown predictor 'nope'") as e:
        make_predictor("nope", shape)
    for name in ("prev-token", "markov", "learned"):
        assert name in e.value.hint
