"""scripts/bench_serve.py: its help, its summary and table on hand-made samples with worked values, and one
tiny run end to end against a real server on 127.0.0.1 (no timing asserted)."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from tests.scripts import load_script

bench = load_script("bench_serve")


def test_help_lists_every_option() -> None:
    result = CliRunner().invoke(bench.app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in ("--model", "--clients", "--requests", "--max-tokens", "--chars", "--budget", "--schedulers",
                   "--max-batch", "--max-wait", "--offload-to", "--device", "--threads", "--timeout", "--out"):
        assert option in result.stdout


def test_summary_of_hand_made_samples() -> None:
    samples = [bench.Sample(0, "ab", 3, 0.100, (0.010, 0.030)), bench.Sample(1, "cd", 5, 0.300, (0.020,))]
    r = bench.summarize(samples, wall_s=2.0, loads=16, clients=2, scheduler="fifo")
    assert (r["tokens"], r["tokens_per_s"], r["loads_per_token"]) == (8, 4.0, 2.0)
    assert np.isclose(r["ttft_ms_p50"], 200) and np.isclose(r["ttft_ms_p95"], 290)  # linear between 100 and 300
    assert np.isclose(r["itl_ms_p50"], 20) and np.isclose(r["itl_ms_p95"], 29)


def test_table_gives_ratios_to_the_first_scheduler_at_the_same_concurrency() -> None:
    def run(clients, scheduler, tps, loads):
        return {"clients": clients, "scheduler": scheduler, "tokens_per_s": tps, "ttft_ms_p50": 100.0,
                "ttft_ms_p95": 150.0, "itl_ms_p50": 20.0, "itl_ms_p95": 30.0, "loads_per_token": loads}

    lines = bench.table([run(4, "fifo", 10.0, 2.0), run(4, "expert-aware", 12.0, 1.5)], "fifo").splitlines()
    assert lines[0].endswith("| vs fifo (tok/s, loads/token) |") and len(lines) == 4
    assert lines[3] == "| 4 | expert-aware | 12.0 | 100 / 150 | 20.0 / 30.0 | 1.50 | 1.20x, 0.75x |"


def test_a_tiny_run_writes_json_and_markdown(tmp_path) -> None:
    out = tmp_path / "bench_serve.json"
    result = CliRunner().invoke(bench.app, ["--clients", "1,2", "--requests", "1", "--max-tokens", "3",
                                            "--chars", "40", "--schedulers", "fifo", "--threads", "1",
                                            "--timeout", "60", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [(r["clients"], r["scheduler"], r["requests"]) for r in data["runs"]] == [(1, "fifo", 1), (2, "fifo", 2)]
    assert all(r["tokens"] == 3 * r["requests"] for r in data["runs"])
    assert data["same_text_at_every_concurrency"] is True and data["same_text_under_every_scheduler"] is True
    assert "loadavg" in data["machine"] and len(data["loadavg_before"]) == 3
    assert data["table"] in result.stdout and out.with_suffix(".md").read_text().startswith(data["table"])
