"""predictors/learned.py: learns a trivially learnable routing, round-trips through safetensors exactly,
and every bad weights file is a one-line ConfigError naming it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from offload.errors import ConfigError
from predictors import MoEShape, RouteContext, make_predictor
from predictors.evaluate import score_trace, shape_of
from predictors.learned import Learned, PathMLP, TrainConfig, load_weights, path_data, save_weights, train

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
    assert report.train_tokens == 180 and report.val_tokens == 20


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
    with torch.no_grad():
        logits = net(data.path_hot[:3], data.prev_hot[:3]).numpy()  # [3, L, J, E]
    p = Learned(shape_of(trace), net=net)
    experts = trace.experts.astype(np.int64)
    prev = np.full((3, 4, 1), -1)  # the first 3 tokens open their sequences (copy_chain interleaves 4)
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
