"""scripts/eval_patterns.py end to end at a small scale: every table's rows, the structure of its JSON."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tests.scripts import load_script

script = load_script("eval_patterns")


def test_a_small_run_writes_every_measurement(tmp_path):
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(script.app, ["--models", "tiny-moe", "--max-tokens", "200", "--new-tokens", "3",
                                        "--count", "2", "--profile-chars", "3000", "--no-sweep", "--out", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert "cpu_model" in result["machine"] and result["params"]["count"] == 2
    rows = result["pruning"]
    assert [(x["text"], x["keep"]) for x in rows] == [(t, k) for t in ("code", "prose") for k in (8, 7, 6, 4, 2, 1)]
    for x in rows:
        if x["keep"] == 8:  # every expert kept: the unpruned model, whichever pattern
            assert x["own"] == x["other"] == x["generic"] == x["full"] and x["own_dropped"] == 0
        if x["keep"] == 1:  # fewer than top-2: not runnable
            assert x["own"] is None
    warm = result["warm_start"]["tiny-moe"]
    assert set(warm["runs"]) == {"none", "matched", "generic"} and 0 <= warm["accuracy"] <= 1
    assert len(warm["runs"]["matched"]["requests"]) == 4 and warm["runs"]["none"]["warm_loads"] == 0
    assert {"tiny-moe", "mixtral-humaneval-0", "mixtral-humaneval-1"} <= set(result["simulated"])
    assert (tmp_path / "eval.md").read_text().count("| tiny-moe |") >= 8 + 3
