"""scripts/bench_families.py: its help, the costs by construction worked out by hand, one tiny run end to end (the
JSON's keys; no timing asserted)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tests.scripts import load_script

bench = load_script("bench_families")
TINY = ["--hidden", "32", "--layers", "4", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--experts", "4",
        "--top-k", "2", "--expert-intermediate", "16", "--linear-key-heads", "2", "--linear-value-heads", "4",
        "--linear-head-dim", "8", "--vocab", "64", "--prompt-len", "70", "--new-tokens", "3", "--repeats", "1",
        "--threads", "1"]


def test_help_lists_every_option() -> None:
    result = CliRunner().invoke(bench.app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in ("--hidden", "--layers", "--experts", "--linear-key-heads", "--prompt-len", "--new-tokens",
                   "--repeats", "--dtype", "--work-dir", "--out"):
        assert option in result.stdout


def test_a_tiny_run_writes_the_json_with_the_costs_by_construction(tmp_path) -> None:
    out = tmp_path / "bench_families.json"
    result = CliRunner().invoke(bench.app, [*TINY, "--work-dir", str(tmp_path / "models"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["benchmark"] == "bench_families" and data["params"]["prompt_len"] == "70"
    assert {"cores", "versions", "loadavg"} <= set(data["machine"]) and "| family |" in data["table"]
    hybrid, plain = data["families"]["qwen3_5_moe"], data["families"]["qwen3_moe"]
    assert set(hybrid["attention_ms_per_layer_token"]) == {"gated-deltanet", "gated-full"}
    assert set(plain["attention_ms_per_layer_token"]) == {"gqa"} and len(plain["samples"]) == 1
    # Gated DeltaNet at hidden 32, 2 key heads and 4 value heads of 8: projections qkv 32 x 64, z 32 x 32, b and a
    # 32 x 4 each, out 32 x 32, conv 64 x 4, and the norm, dt_bias, A_log; its float32 state (4 x 8 x 8) plus the
    # conv's 64 x 3 inputs is read and written once per token
    weights = 32 * 64 + 32 * 32 + 2 * 32 * 4 + 32 * 32 + 64 * 4 + 8 + 4 + 4
    state = 4 * 8 * 8 * 4 + 64 * 3 * 4
    assert hybrid["by_construction"]["gated-deltanet"] == {
        "weight_bytes": weights * 4, "state_or_kv_bytes_read": 2 * state, "flops": 2 * weights + 7 * 4 * 8 * 8}
    # GQA over 70 tokens of context: 2 kv heads of 8 keys and values, float32
    gqa = plain["by_construction"]["gqa"]
    assert gqa["state_or_kv_bytes_read"] == 70 * 2 * 2 * 8 * 4 and gqa["flops"] > 4 * 4 * 8 * 70
