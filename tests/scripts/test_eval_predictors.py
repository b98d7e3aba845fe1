"""scripts/train_predictor.py and scripts/eval_predictors.py end to end on small synthetic traces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.predictors.synthetic import copy_chain, save
from tests.scripts import load_script

train_script = load_script("train_predictor")
eval_script = load_script("eval_predictors")


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("traces")
    return (save(copy_chain(80, 4, 6, seed=0), folder / "a.jsonl.gz"),
            save(copy_chain(40, 4, 6, seed=1), folder / "b.jsonl.gz"))


def test_train_then_eval_with_the_weights(traces, tmp_path) -> None:
    a, b = traces
    weights = tmp_path / "p.safetensors"
    r = CliRunner().invoke(train_script.app, ["--trace", str(a), "--out", str(weights), "--steps", "100"])
    assert r.exit_code == 0, r.output
    assert "train loss" in r.stdout and weights.is_file()
    out = tmp_path / "eval"
    r = CliRunner().invoke(eval_script.app, [
        "--train", str(a), "--test", str(b), "--train", f"{a}@0-1", "--test", f"{a}@2-3",
        "--learned-weights", str(weights), "--out", str(out), "--capacity", "25%"])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "eval.json").read_text())
    assert result["schema"] == "offload-predictor-eval/1" and "cpu_model" in result["machine"]
    assert result["params"]["lookahead"] == [1, 2] and result["params"]["latency"] == [1, 2]
    # 2 splits x 3 predictors x 2 lookaheads x k in {1, 2} (top-1 trace)
    assert len(result["accuracy"]) == 24
    # 2 splits x 1 capacity x 2 policies x (none + 3 predictors x 2 lookaheads x 2 latencies)
    assert len(result["simulation"]) == 2 * 2 * 13
    learned = [x for x in result["accuracy"] if x["predictor"] == "learned" and x["k"] == 1]
    assert min(x["precision"] for x in learned) > 0.9  # the copy chain is trivially predictable
    none = [x for x in result["simulation"] if x["predictor"] == "none" and x["policy"] == "lru"]
    assert all(x["vs_lru"] == 1.0 and x["issued"] == 0 for x in none)
    assert all(x["issued"] == x["used"] + x["wasted"] for x in result["simulation"])
    assert "| a → b | prev-token | 1 |" in r.stdout and (out / "eval.md").read_text() in r.stdout


def test_eval_errors_are_one_line(traces, tmp_path) -> None:
    a, b = traces
    r = CliRunner().invoke(eval_script.app, ["--train", str(a), "--test", str(b), "--predictors", "nope",
                                             "--out", str(tmp_path)])
    assert r.exit_code == 1 and "Error: unknown predictor 'nope'" in r.output and "markov" in r.output
    r = CliRunner().invoke(eval_script.app, ["--train", str(a), "--test", str(b), "--predictors", "learned",
                                             "--learned-weights", str(tmp_path / "none.safetensors"),
                                             "--out", str(tmp_path)])
    assert r.exit_code == 1 and "none.safetensors: no such learned-predictor weights file" in r.output
    r = CliRunner().invoke(eval_script.app, ["--train", str(a), "--out", str(tmp_path), "--test", str(b),
                                             "--test", str(b)])
    assert r.exit_code == 1 and "1 --train but 2 --test" in r.output


def test_workloads_pair_up_in_both_directions_within_one_model(traces, tmp_path) -> None:
    a, b = traces
    other = save(copy_chain(30, 3, 5, seed=2), tmp_path / "other.jsonl.gz")  # another model: never paired
    splits = eval_script.make_splits([], [], [str(a), str(b), str(other)])
    assert [s.name for s in splits] == ["a → b", "b → a"]
    with pytest.raises(Exception, match="no split to evaluate"):
        eval_script.make_splits([], [], [str(a)])
