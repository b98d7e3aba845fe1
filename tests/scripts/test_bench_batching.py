"""scripts/bench_batching.py: its help, its table on hand-made runs, one tiny run end to end (no timing asserted)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tests.scripts import load_script

bench = load_script("bench_batching")


def test_help_lists_every_option() -> None:
    result = CliRunner().invoke(bench.app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in ("--model", "--prompts", "--chars", "--max-new-tokens", "--batch-size", "--pool-size",
                   "--max-wait", "--budgets", "--schedulers", "--offload-to", "--device", "--threads", "--repeats",
                   "--out"):
        assert option in result.stdout


def _run(budget: str, scheduler: str, distinct: float, loads: float, tps: float) -> dict:
    return {"budget": budget, "scheduler": scheduler, "slots": 20, "distinct_per_layer_step": distinct,
            "loads_per_token": loads, "tokens_per_s": tps, "tokens_per_decode_step": 2.0}


def test_table_gives_ratios_to_the_first_scheduler_at_the_same_budget() -> None:
    runs = [_run("25%", "fifo", 4.0, 2.0, 10.0), _run("25%", "expert-aware", 3.0, 1.0, 12.0),
            _run("50%", "fifo", 2.0, 1.0, 20.0)]
    lines = bench.table(runs, "fifo").splitlines()
    assert lines[0].endswith("| ratios vs fifo (distinct, loads/token, tok/s) |") and len(lines) == 5
    assert lines[3] == "| 25% (20 slots) | expert-aware | 3.00 | 1.00 | 12.0 | 2.00 | 0.75x, 0.50x, 1.20x |"
    assert lines[4].endswith("| 1.00x, 1.00x, 1.00x |")


def test_a_tiny_run_writes_the_json(tmp_path) -> None:
    out = tmp_path / "bench_batching.json"
    result = CliRunner().invoke(bench.app, ["--prompts", "3", "--chars", "40", "--max-new-tokens", "2",
                                            "--batch-size", "2", "--budgets", "50%", "--repeats", "1",
                                            "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data) == {"benchmark", "command", "params", "device", "machine", "prompts",
                         "same_tokens_under_every_scheduler", "runs", "table"}
    assert data["device"] == "cpu" and data["params"]["budgets"] == "50%" and len(data["prompts"]) == 3
    assert data["same_tokens_under_every_scheduler"] is True  # scheduling never changes a request's tokens
    assert [r["scheduler"] for r in data["runs"]] == ["fifo", "expert-aware"]
    assert data["table"] in result.stdout and "loadavg" in data["machine"]
