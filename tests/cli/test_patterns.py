"""`offload profile`, `offload info --patterns` and the --patterns / --task / --prune options on the bundled
tiny-moe through typer's CliRunner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cli.main import app
from tests.paths import ROOT

runner = CliRunner()
PROMPTS = ROOT / "scripts" / "results" / "traces"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_profile_info_and_run_with_patterns(tmp_path):
    code = tmp_path / "code.jsonl"
    code.write_text("".join((PROMPTS / "stdlib-heldout.prompts.jsonl").read_text().splitlines(True)[:6]))
    out = tmp_path / "patterns.json"
    result = invoke("profile", "tiny-moe", "--task", f"code={code}", "--trace",
                    f"prose={ROOT / 'scripts/results/traces/tiny-moe-stdlib-prose.jsonl.gz'}", "--out", out)
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["format"] == "offload-expert-patterns/1" and list(saved["tasks"]) == ["code", "prose", "generic"]
    assert "wrote" in result.stderr and "code" in result.stderr

    info = invoke("info", "tiny-moe", "--patterns", out)
    assert info.exit_code == 0, info.output
    assert "50%" in info.stdout and "95%" in info.stdout and "--prune" in info.stdout

    run = invoke("run", "tiny-moe", "def f(x):", "--max-new-tokens", 4, "--patterns", out, "--expert-budget", "25%")
    assert run.exit_code == 0, run.output
    assert "warm start" in run.stderr and "task " in run.stderr

    pruned = invoke("run", "tiny-moe", "def f(x):", "--max-new-tokens", 4, "--patterns", out, "--prune", "50%",
                    "--task", "code")
    assert pruned.exit_code == 0, pruned.output
    assert "20 of 40 experts cached" in pruned.stderr and "pruned to code" in pruned.stderr


def test_pattern_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "offload-expert-patterns/1", "model": ')
    for args, message in [(("--patterns", bad), "truncated or not a patterns file"),
                          (("--prune", "50%"), "--prune needs --patterns"),
                          (("--patterns", tmp_path / "none.json"), "does not exist")]:
        result = invoke("run", "tiny-moe", "x", "--max-new-tokens", 1, *args)
        assert result.exit_code != 0 and message in result.stderr, result.output
        assert result.stderr.startswith("Error: ") and "Traceback" not in result.output
    result = invoke("profile", "tiny-moe", "--trace", "code=nowhere.jsonl", "--out", tmp_path / "p.json")
    assert result.exit_code != 0 and "does not exist" in result.stderr and not (tmp_path / "p.json").exists()
