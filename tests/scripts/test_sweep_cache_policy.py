"""scripts/sweep_cache_policy.py end to end on the HumanEval trace: files, exact table figures, errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from offload.errors import ConfigError
from tests.scripts import ROOT, SCRIPTS, load_script, script_env

SCRIPT = SCRIPTS / "sweep_cache_policy.py"
TRACE = ROOT / "tests" / "data" / "mixtral-8x7b-humaneval.jsonl.gz"
BASELINES = json.loads((ROOT / "tests" / "data" / "mixtral-8x7b-humaneval.baselines.json").read_text())
EXPERT_BYTES = 3 * 4096 * 14336 * 2  # one bf16 Mixtral-8x7B expert: w1, w2, w3 of 4096 x 14336

script = load_script("sweep_cache_policy")


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("sweep")
    result = CliRunner().invoke(script.app, ["--trace", str(TRACE), "--out", str(out),
                                             "--expert-bytes", str(EXPERT_BYTES), "--bandwidth", "25"])
    assert result.exit_code == 0, result.output
    return out, result.stdout


def table(stdout: str, title: str) -> dict[str, dict[str, str]]:
    """The Markdown table after the line containing ``title``, as {row label: {column: cell}}."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if title in line) + 2
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(head[1:], cells[1:]))
    return rows


def test_table_reproduces_every_reference_figure(swept) -> None:
    _, stdout = swept
    per_layer = table(stdout, "per-layer cache, hit rate")
    for capacity, row in BASELINES["per_layer"].items():
        assert {p: per_layer[capacity][p] for p in row} == {p: f"{v:.4f}" for p, v in row.items()}
    assert per_layer["2"] == {"lru": "0.3429", "lfu": "0.2893", "fifo": "0.3241", "belady": "0.4772"}
    glob = table(stdout, "global cache, hit rate")
    for share, row in BASELINES["global"].items():
        cells = glob[f"{share} ({row['capacity']})"]
        assert (cells["lru"], cells["belady"]) == (f"{row['lru']:.4f}", f"{row['belady']:.4f}")
    assert glob["75% (192)"]["belady"] == "0.9327"


def test_files_hold_the_exact_counts(swept) -> None:
    out, _ = swept
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["schema"] == "offload-sweep/1" and doc["machine"]["cores"] >= 1
    assert doc["params"]["global"] == ["25%", "50%", "75%"]
    records = doc["records"]
    assert len(records) == 4 * (7 + 3)
    by = {(r["policy"], r["scope"], r["capacity"]): r for r in records}
    for capacity, row in BASELINES["per_layer"].items():
        for policy, rate in row.items():
            r = by[policy, "per-layer", int(capacity)]
            assert r["hit_rate"] == rate and r["hits"] == round(rate * 21632) and r["accesses"] == 21632
    lru64 = by["lru", "global", 64]
    assert (lru64["hits"], lru64["misses"], lru64["tokens"]) == (7417, 14215, 338)
    assert lru64["bytes_per_token"] == pytest.approx(14215 / 338 * EXPERT_BYTES, rel=1e-12)
    assert lru64["transfer_s_per_token"] == pytest.approx(lru64["bytes_per_token"] / 25e9, rel=1e-12)
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["policy"], r["scope"], int(r["hits"])) for r in rows] == \
        [(r["policy"], r["scope"], r["hits"]) for r in records]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transfer_tables_are_printed(swept) -> None:
    _, stdout = swept
    ms = table(stdout, "per-layer cache, transfer-bound ms per token")
    assert ms["1"]["lru"] == f"{19727 / 338 * EXPERT_BYTES / 25e9 * 1e3:,.2f}"  # 19,727 misses at C=1


@pytest.mark.parametrize("args, message", [
    (["--policies", "lru,mru"], "Error: unknown simulator policy 'mru'"),
    (["--per-layer", "7-1"], "Error: bad capacity '7-1'"),
    (["--bandwidth", "25"], "Error: --bandwidth needs a value > 0 and --expert-bytes"),
    (["--per-layer", "", "--global", ""], "Error: nothing to sweep"),
])
def test_bad_options_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(script.app, ["--trace", str(TRACE), "--out", str(tmp_path), *args])
    assert result.exit_code == 1 and result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_bad_trace_path_exits_non_zero_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl.gz"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--trace", str(missing), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env=script_env(), check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"Error: {missing}: no such trace file\n"
    assert not (tmp_path / "o").exists()


def test_expert_bytes_and_bandwidth_take_sizes_as_the_readme_writes_them() -> None:
    assert script.expert_nbytes(str(EXPERT_BYTES)) == script.expert_nbytes("336MiB") == EXPERT_BYTES
    assert script.expert_nbytes(None) is None and script.bandwidth_gbps(None) is None
    assert script.bandwidth_gbps("25") == script.bandwidth_gbps("25GB/s") == 25.0
    assert script.bandwidth_gbps("1GiB/s") == pytest.approx(2**30 / 1e9)
    with pytest.raises(ConfigError, match="is a share"):
        script.expert_nbytes("25%")
    with pytest.raises(ConfigError, match="cannot parse --bandwidth"):
        script.bandwidth_gbps("50%")
