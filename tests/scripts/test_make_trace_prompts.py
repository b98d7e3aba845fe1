"""scripts/make_trace_prompts.py: both prompt sets written as JSON lines, deterministic, through the Typer app."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tests.scripts import load_script

script = load_script("make_trace_prompts")


def test_writes_both_prompt_sets(tmp_path) -> None:
    out = tmp_path / "traces"
    result = CliRunner().invoke(script.app, ["--out", str(out), "--prompts", "3", "--chars", "60"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["stdlib-heldout.prompts.jsonl", "stdlib-prose.prompts.jsonl"]
    for name in ("stdlib-heldout", "stdlib-prose"):
        prompts = [json.loads(line)["prompt"] for line in (out / f"{name}.prompts.jsonl").read_text().splitlines()]
        assert len(prompts) == 3 and all(0 < len(p) <= 60 for p in prompts)
        assert f"wrote {out / name}.prompts.jsonl: 3 prompts" in result.stdout
    code = (out / "stdlib-heldout.prompts.jsonl").read_text()
    again = CliRunner().invoke(script.app, ["--out", str(out), "--prompts", "3", "--chars", "60"])
    assert again.exit_code == 0 and (out / "stdlib-heldout.prompts.jsonl").read_text() == code


def test_out_is_required() -> None:
    result = CliRunner().invoke(script.app, ["--prompts", "3"])
    assert result.exit_code == 2 and "--out" in result.output
