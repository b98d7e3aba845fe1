"""scripts/sim_batching.py end to end on a small synthetic trace: files, records, ratios, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from offload.traces.format import TraceHeader, TraceWriter
from tests.scripts import load_script

script = load_script("sim_batching")


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 sequences of 4 prefill and 20 decode tokens, 2 layers of 4 experts, top-2, seeded."""
    path = tmp_path_factory.mktemp("trace") / "synthetic.jsonl.gz"
    rng = np.random.default_rng(0)
    with TraceWriter(path, TraceHeader("synthetic", num_layers=2, num_experts=4, top_k=2)) as w:
        for seq in range(3):
            for pos in range(24):
                experts = [rng.choice(4, size=2, replace=False) for _ in range(2)]
                w.write(seq, pos, "prefill" if pos < 4 else "decode", experts, [[0.5, 0.5]] * 2)
    return path


def test_writes_json_and_table(trace, tmp_path) -> None:
    args = ["--trace", str(trace), "--out", str(tmp_path), "--requests", "30", "--batch-size", "2,4",
            "--cache", "25%,4", "--max-wait", "1,3", "--prediction", "prev-token,oracle", "--relabel",
            "--min-tokens", "5"]
    result = CliRunner().invoke(script.app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "batching.json").read_text())
    assert data["schema"] == "offload-batching-sim/1" and data["machine"]["cores"] >= 1
    assert data["params"]["requests"] == 30 and data["params"]["max_waits"] == [1, 3]
    stats = data["locality"]["synthetic.jsonl.gz"]
    assert set(stats) == {"prev_token", "same_seq", "other_seq", "chance", "duplicates"}
    records = data["records"]
    # per workload: 2 batch sizes x 2 caches x (fifo + 2 max waits x 2 predictions)
    assert len(records) == 2 * 2 * 2 * 5
    assert {r["workload"] for r in records} == {"trace", "relabelled"}
    assert {r["cache"] for r in records} == {"25% (2)", "4"}
    tokens = {r["tokens"] for r in records}
    assert len(tokens) == 1  # every run generates the same requests' tokens
    for r in records:
        assert r["pool"] == 2 * r["batch_size"]
        if r["scheduler"] == "expert-aware":
            assert r["wait_max"] <= r["max_wait"]  # the pool of 2 x batch is within batch x (max_wait + 1)
    table = (tmp_path / "batching.md").read_text()
    assert table in result.stdout
    fifo_rows = [line for line in table.splitlines() if "| fifo |" in line]
    assert len(fifo_rows) == 8 and all(line.count("| 1.000 |") == 2 for line in fifo_rows)
    assert "expert-aware (wait<=3, oracle)" in table
    assert "of the requests repeat an earlier one" in table


@pytest.mark.parametrize("extra, message", [
    (["--schedulers", "fifo,random"], "unknown scheduler 'random'"),
    (["--pool", "two"], "bad pool 'two'"),
    (["--batch-size", "0"], "bad batch size"),
    (["--cache", ""], "no cache size"),
    (["--policy", "belady"], "belady"),
])
def test_errors_are_one_line(trace, tmp_path, extra, message) -> None:
    result = CliRunner().invoke(script.app, ["--trace", str(trace), "--out", str(tmp_path), "--requests", "4",
                                             *extra])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output and result.output.count("\n") == 1
