"""predictors/base.py: shapes are validated, candidates are stable on ties, predecessors follow their
own sequence, and from_model is the one way the runtime builds a predictor."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from offload.errors import ConfigError
from predictors import PREDICTORS, MoEShape, make_predictor, next_token_context, next_token_layers, top_candidates
from predictors.base import check_shape, prev_routes, shape_of, step_probabilities


def test_shapes_are_validated():
    with pytest.raises(ConfigError, match="bad MoE shape"):
        MoEShape(2, 4, 5)
    assert shape_of(SimpleNamespace(header=SimpleNamespace(num_layers=3, num_experts=8, top_k=2))) == MoEShape(3, 8, 2)


def test_top_candidates_best_first_stable_on_ties():
    scores = np.array([[0.1, 0.9, 0.9, 0.3], [5.0, 1.0, 2.0, 2.0]])
    assert top_candidates(scores, 3).tolist() == [[1, 2, 3], [0, 2, 3]]


def test_prev_routes_interleaved_sequences():
    experts = np.arange(5 * 2 * 1).reshape(5, 2, 1)
    prev = prev_routes(np.array([0, 1, 0, 0, 1]), experts)
    assert prev[:, 0, 0].tolist() == [-1, -1, 0, 4, 2]


def test_check_shape_names_both_shapes():
    p = make_predictor("prev-token", MoEShape(2, 4, 2))
    trace = SimpleNamespace(header=SimpleNamespace(num_layers=3, num_experts=4, top_k=2), path="t.jsonl")
    with pytest.raises(ConfigError, match="t.jsonl has shape"):
        check_shape(p, trace)


def test_from_model_defaults_to_the_constructor_and_every_registered_predictor_has_it():
    shape = MoEShape(2, 4, 2)
    p = PREDICTORS["markov"].from_model(object(), shape, Path("/nonexistent"), horizon=1)
    assert p.shape == shape and p.horizon == 1
    assert all(callable(getattr(cls, "from_model", None)) for cls in PREDICTORS.values())
    with pytest.raises(ConfigError, match="unknown predictor 'oracle'"):
        make_predictor("oracle", shape)


def test_next_token_context_and_layers_in_reach():
    route = np.array([[[1, 2], [3, -1]]])  # [tokens, layers, top_k]: this token has routed layer 0 only
    ctx = next_token_context(route)
    assert ctx.layer == -1 and ctx.path.shape == (1, 0, 2) and ctx.prev.tolist() == route.tolist()
    # 4 layers, lookahead 2: from layer 2 the next token's layer 0 is in reach, from layer 3 its layers 0, 1
    assert [next_token_layers(layer, 2, 4) for layer in range(4)] == [0, 0, 1, 2]
    assert next_token_layers(0, 9, 4) == 1  # never past the layers this token has already left behind


def test_default_probabilities_sum_to_top_k_and_step_probabilities_combine_tokens():
    predictor = make_predictor("prev-token", MoEShape(2, 4, 2))
    p = predictor.probabilities(np.log(np.array([[4.0, 2.0, 1.0, 1.0]])))
    np.testing.assert_allclose(p, [[1.0, 0.5, 0.25, 0.25]])  # softmax x top_k = [1, .5, .25, .25]
    both = step_probabilities(predictor, np.log(np.array([[4.0, 2.0, 1.0, 1.0], [1.0, 1.0, 4.0, 2.0]])))
    np.testing.assert_allclose(both, [1.0, 1 - 0.5 * 0.75, 1.0, 1 - 0.75 * 0.5])  # any of the tokens
