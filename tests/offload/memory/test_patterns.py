"""Task expert patterns: TCESS, rankings and coverage on hand-made routes, the file format and its refusals,
matching, and --prune's amounts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from offload.errors import ConfigError
from offload.memory.patterns import (
    FORMAT,
    GENERIC,
    ModelIdentity,
    Patterns,
    TaskPattern,
    load_patterns,
    parse_prune,
    pooled,
    tcess,
)

MODEL = ModelIdentity("tiny", "MixtralForCausalLM", (0, 2), 4, 2)  # 2 MoE layers (model layers 0, 2), 4 experts

# 3 tokens, 2 layers, top-2. Layer 0 weights are already renormalised; layer 1's are raw softmax probabilities
# (norm_topk_prob false) and get renormalised: (0.3, 0.1) -> (0.75, 0.25), (0.2, 0.2) -> (0.5, 0.5).
EXPERTS = np.array([[[0, 1], [2, 3]],
                    [[0, 2], [2, 0]],
                    [[1, 0], [3, 2]]])
WEIGHTS = np.array([[[0.6, 0.4], [0.3, 0.1]],
                    [[0.9, 0.1], [0.2, 0.2]],
                    [[0.8, 0.2], [0.5, 0.5]]])


def test_tcess_by_hand():
    importance, frequency = tcess(EXPERTS, WEIGHTS, 4, threshold=0.0)
    # layer 0: e0 = (0.6 + 0.9 + 0.2) / 3, e1 = (0.4 + 0.8) / 3, e2 = 0.1 / 3, e3 never
    # layer 1: e2 = (0.75 + 0.5 + 0.5) / 3, e3 = (0.25 + 0.5) / 3, e0 = 0.5 / 3
    np.testing.assert_allclose(importance, [[1.7 / 3, 1.2 / 3, 0.1 / 3, 0], [0.5 / 3, 0, 1.75 / 3, 0.75 / 3]])
    np.testing.assert_allclose(frequency, [[1, 2 / 3, 1 / 3, 0], [1 / 3, 0, 1, 2 / 3]])
    np.testing.assert_allclose(importance.sum(1), 1)  # r = 0: every selection counts, a layer sums to 1


def test_the_threshold_drops_low_confidence_selections():
    importance, frequency = tcess(EXPERTS, WEIGHTS, 4, threshold=0.3)
    # layer 0 drops 0.2 (e0, token 2) and 0.1 (e2); layer 1 drops 0.25 (e3, token 0)
    np.testing.assert_allclose(importance, [[1.5 / 3, 1.2 / 3, 0, 0], [0.5 / 3, 0, 1.75 / 3, 0.5 / 3]])
    np.testing.assert_allclose(frequency, tcess(EXPERTS, WEIGHTS, 4, threshold=0.0)[1])  # it ignores r


def test_ranking_ranked_keys_and_coverage():
    t = TaskPattern.measure("code", EXPERTS, WEIGHTS, 4, threshold=0.0)
    assert t.ranking.tolist() == [[0, 1, 2, 3], [2, 3, 0, 1]]
    assert t.top(2).tolist() == [[0, 1], [2, 3]]
    # across layers by score: (1,2) .583, (0,0) .567, (0,1) .4, (1,3) .25, (1,0) .167, (0,2) .033; unused experts never
    assert t.ranked_keys() == [(1, 2), (0, 0), (0, 1), (1, 3), (1, 0), (0, 2)]
    # warm start: the last prompt token's route first, then the ranked keys not in it, at most the slots given
    assert t.warm_keys(np.array([[3, 0], [1, 2]]), 5) == [(0, 3), (0, 0), (1, 1), (1, 2), (0, 1)]
    assert t.warm_keys(None, 2) == [(1, 2), (0, 0)]
    # 50%: layer 0 needs e0 (.567 of 1); 80%: e0 + e1 (.967); 95%: the same two; layer 1: 2, 2, 3 (.583, .833, 1)
    assert [t.coverage(m).tolist() for m in (0.5, 0.8, 0.95)] == [[1, 1], [2, 2], [2, 3]]


def test_ties_rank_the_more_frequent_then_the_lower_id():
    experts = np.array([[[0, 1]], [[2, 3]], [[2, 1]]])  # one layer
    weights = np.array([[[0.5, 0.5]], [[0.5, 0.5]], [[0.5, 0.5]]])  # e1 and e2: score 1/3, used twice; e0, e3 once
    assert TaskPattern.measure("t", experts, weights, 4, threshold=0.0).ranking.tolist() == [[1, 2, 0, 3]]


def test_the_generic_pattern_is_the_pooled_tokens():
    a = TaskPattern.measure("a", EXPERTS[:2], WEIGHTS[:2], 4)
    b = TaskPattern.measure("b", EXPERTS[2:], WEIGHTS[2:], 4)
    g, whole = pooled([a, b]), TaskPattern.measure(GENERIC, EXPERTS, WEIGHTS, 4)
    assert g.name == GENERIC and g.tokens == 3
    np.testing.assert_allclose(g.importance, whole.importance)
    np.testing.assert_allclose(g.frequency, whole.frequency)


def make_patterns() -> Patterns:
    code = TaskPattern.measure("code", EXPERTS, WEIGHTS, 4)
    prose = TaskPattern.measure("prose", 3 - EXPERTS, WEIGHTS, 4)  # the mirror image: experts 3, 2, ... instead
    return Patterns(MODEL, {"code": code, "prose": prose, GENERIC: pooled([code, prose])})


def test_a_patterns_file_round_trips(tmp_path):
    p = make_patterns()
    p.save(tmp_path / "p.json")
    back = load_patterns(tmp_path / "p.json")
    assert back.model == MODEL and list(back.tasks) == ["code", "prose", GENERIC] and back.threshold == p.threshold
    for name, t in p.tasks.items():
        np.testing.assert_array_equal(back.tasks[name].importance, t.importance)
        np.testing.assert_array_equal(back.tasks[name].ranking, t.ranking)
        assert back.tasks[name].tokens == t.tokens
    assert not list(tmp_path.glob("*.partial"))


def broken(tmp_path, edit) -> str:
    obj = make_patterns().to_json()
    edit(obj)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ConfigError) as e:
        load_patterns(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    return str(e.value)


def test_bad_files_are_one_line_errors(tmp_path):
    assert FORMAT in broken(tmp_path, lambda o: o.update(format="offload-expert-patterns/2"))
    assert "'tokens'" in broken(tmp_path, lambda o: o["tasks"]["code"].pop("tokens"))
    assert "'ranking'" in broken(tmp_path, lambda o: o["tasks"]["code"]["layers"][0].update(ranking=[0, 0, 1, 2]))
    assert "'importance'" in broken(tmp_path, lambda o: o["tasks"]["code"]["layers"][1].update(importance=[1, 2]))
    assert "2 layers" in broken(tmp_path, lambda o: o["tasks"]["code"]["layers"].pop())
    assert GENERIC in broken(tmp_path, lambda o: o["tasks"].pop(GENERIC))
    truncated = tmp_path / "cut.json"
    make_patterns().save(truncated)
    truncated.write_text(truncated.read_text()[:200])
    with pytest.raises(ConfigError, match="truncated or not a patterns file") as e:
        load_patterns(truncated)
    assert str(truncated) in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_patterns(tmp_path / "missing.json")


def test_patterns_of_another_model_are_refused_by_name_and_shape():
    MODEL.check(ModelIdentity("tiny", "", (0, 2), 4, 2), "p.json")  # architecture is informative only
    with pytest.raises(ConfigError, match=r"p.json was profiled on 'tiny' .* not on 'other'"):
        MODEL.check(ModelIdentity("other", "MixtralForCausalLM", (0, 2), 4, 2), "p.json")
    with pytest.raises(ConfigError, match="8 experts"):
        MODEL.check(ModelIdentity("tiny", "MixtralForCausalLM", (0, 2), 8, 2), "p.json")


def test_matching_picks_the_task_whose_frequencies_explain_the_prompt():
    p = make_patterns()
    code_like = EXPERTS[[0, 1, 2, 0]]
    m = p.match(code_like)
    assert m.task == "code" and m.confidence > 0.9 and m.scores["code"] > m.scores["prose"]
    assert p.match(3 - code_like).task == "prose"
    # a prompt both tasks explain equally (every expert once per layer): no task is close, the generic pattern
    even = np.array([[[0, 1], [0, 1]], [[2, 3], [2, 3]]])
    m = p.match(even)
    assert m.task == GENERIC and m.confidence == pytest.approx(0.5)
    assert p.match(np.zeros((0, 2, 2), dtype=int)).task == GENERIC


@pytest.mark.parametrize("text, keep", [("4", 4), (2, 2), ("50%", 2), ("0.5", 2), ("62.5%", 3), ("1.0", 4),
                                        ("100%", 4), ("0.6", 3)])
def test_prune_amounts(text, keep):
    assert parse_prune(text, 4, 2) == keep


@pytest.mark.parametrize("text, message", [("1", "fewer than the 2"), ("25%", "fewer than the 2"),
                                           ("5", "the model has 4"), ("x", "cannot parse"), ("-1", "cannot parse"),
                                           ("", "invalid")])
def test_bad_prune_amounts(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_prune(text, 4, 2)
