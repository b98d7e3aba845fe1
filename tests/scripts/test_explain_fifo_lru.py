"""scripts/explain_fifo_lru.py end to end on small synthetic traces."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tests.predictors.synthetic import copy_chain, save
from tests.scripts import load_script

explain_script = load_script("explain_fifo_lru")


def test_explain_charges_every_miss_to_an_eviction(tmp_path) -> None:
    a, b = save(copy_chain(60, 4, 6, seed=0), tmp_path / "a.jsonl.gz"), save(copy_chain(30, 4, 6, seed=1),
                                                                          tmp_path / "b.jsonl.gz")
    out = tmp_path / "explain"
    r = CliRunner().invoke(explain_script.app, ["--train", str(a), "--test", str(b), "--policies", "lru,fifo",
                                                "--capacity", "6", "--out", str(out)])
    assert r.exit_code == 0, r.output
    records = json.loads((out / "explain.json").read_text())["records"]
    assert [(x["policy"], x["mode"]) for x in records][:3] == [("lru", m) for m in explain_script.MODES]
    for x in records:
        assert sum(x["buckets"].values()) == sum(x["miss_causes"].values()) == x["misses"]
    assert "prefetch +1..+2" in r.stdout


def test_buckets_fold_causes_by_distance() -> None:
    causes = {"cold": 3, "demand +0": 2, "demand +5": 1, "prefetch +0": 4, "prefetch +2": 5, "prefetch +4": 6,
              "prefetch +9": 7}
    assert explain_script.buckets(causes, 2, 32) == {
        "cold": 3, "demand +0": 2, "demand other": 1, "prefetch +0": 4, "prefetch +1..+2": 5, "prefetch +3..+4": 6,
        "prefetch other": 7}
