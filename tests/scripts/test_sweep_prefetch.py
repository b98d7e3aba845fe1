"""scripts/sweep_prefetch.py end to end on small synthetic traces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.predictors.synthetic import copy_chain, save
from tests.scripts import load_script

sweep_script = load_script("sweep_prefetch")


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("traces")
    return (save(copy_chain(60, 4, 6, seed=0), folder / "a.jsonl.gz"),
            save(copy_chain(30, 4, 6, seed=1), folder / "b.jsonl.gz"))


def test_sweep_writes_every_run_beside_belady(traces, tmp_path) -> None:
    a, b = traces
    out = tmp_path / "sweep"
    r = CliRunner().invoke(sweep_script.app, [
        "--workload", str(a), "--workload", str(b), "--policies", "lru,layer-lru", "--predictors", "none,markov",
        "--capacity", "25%", "--candidates", "1x,2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "prefetch.json").read_text())
    assert result["schema"] == "offload-prefetch-sweep/1" and result["params"]["latency"] == 2
    # 2 splits x 1 capacity x 2 policies x (none + markov at k = 1 (top-k) and 2)
    assert len(result["runs"]) == 2 * 2 * 3 and len(result["belady"]) == 2
    for run in result["runs"]:
        assert run["meets"] == (run["effective_hit_rate"] >= run["belady"])
        assert sum(run["miss_causes"].values()) == run["misses"]
        assert run["effective_hit_rate"] == 1 - (run["misses"] + run["stalls"]) / run["accesses"]
    none = [x for x in result["runs"] if x["predictor"] == "none"]
    assert all(x["issued"] == 0 and x["stalls"] == 0 for x in none)
    # the copy chain repeats layer 0's expert: markov learns it, and prefetching beats demand paging
    best = max(result["runs"], key=lambda x: x["effective_hit_rate"])
    assert best["predictor"] == "markov" and best["meets"]
    assert "| **Belady** (demand only) |" in r.stdout and (out / "prefetch.md").read_text() in r.stdout


def test_sweep_errors_are_one_line(traces, tmp_path) -> None:
    a, b = traces
    r = CliRunner().invoke(sweep_script.app, ["--train", str(a), "--test", str(b), "--policies", "mru",
                                              "--out", str(tmp_path)])
    assert r.exit_code == 1 and "Error: unknown simulator policy 'mru'" in r.output
    r = CliRunner().invoke(sweep_script.app, ["--train", str(a), "--test", str(b), "--candidates", "x",
                                              "--out", str(tmp_path)])
    assert r.exit_code == 1 and "bad --candidates" in r.output
    assert sweep_script.parse_candidates("1x, 2x,3") == ["1x", "2x", "3"]
    assert [sweep_script.candidates_for(k, 8) for k in ("1x", "2x", "3")] == [8, 16, 3]
