"""scripts/eval_quant.py: a short run writes its JSON and table with every format against float32."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tests.scripts import load_script

script = load_script("eval_quant")


def test_a_short_run_scores_every_format(tmp_path):
    out = tmp_path / "q.json"
    result = CliRunner().invoke(script.app, ["--schemes", "int8,int4-g32-sym", "--max-tokens", "300", "--context",
                                             "128", "--stride", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["scheme"] for r in data["rows"]] == ["float32", "int8", "int4-g32-sym", "int4-g32-sym"]
    modes = ("int8", "int16", "float32")
    assert data["tokens"] == 300 and all(r[m]["tokens"] == 299 for r in data["rows"] for m in modes)
    table = out.with_suffix(".md").read_text()
    assert "| int8 | round to nearest |" in table and "| int4-g32-sym | clip search |" in table
    assert data["rows"][1]["int8"]["expert_bytes"] < data["rows"][0]["int8"]["expert_bytes"] / 3.9
