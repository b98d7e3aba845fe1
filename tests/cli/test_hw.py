"""cli/hw.py through CliRunner: `offload bench-hw` at tiny sizes (no timing asserted: shared machines) and
`offload plan` on a tiny checkpoint, with a hand-made trace, without one, and its one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.main import app
from offload.checkpoint.plan import plan_checkpoint
from offload.hw.calibration import Calibration
from offload.traces.format import TraceHeader, TraceRecord, write_trace

runner = CliRunner()
TINY = ("--hidden", 64, "--intermediate", 128, "--batches", "1,2", "--memory-mib", 1, "--disk-mib", 1,
        "--gemv-mib", 1, "--repeats", 1, "--no-cuda", "--threads", 1)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_bench_hw_writes_a_calibration_and_prints_its_table(tmp_path):
    out = tmp_path / "cache" / "hw.json"
    result = invoke("bench-hw", "--out", out, "--path", tmp_path / "disk", *TINY, "--formats", "bfloat16,int8")
    assert result.exit_code == 0, result.output
    c = Calibration.load(out)
    assert c.shape == (64, 128) and set(c.cpu_gemv["int8"]) == {1, 2} and "cpu_gemv.int8" in c.measured
    assert "host memory bandwidth" in result.stdout and "CPU expert int8" in result.stdout
    assert f"wrote {out}" in result.stderr.replace("\n", "") and list((tmp_path / "disk").iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (("--batches", "1,x"), "Error: --batches '1,x' is not a comma list of whole numbers"),
    (("--formats", "fp8"), "Error: unknown expert format 'fp8' to measure"),
    (("--repeats", 0), "Error: --memory-mib, --disk-mib, --gemv-mib and --repeats must be >= 1"),
])
def test_bench_hw_bad_options_are_one_line_errors(tmp_path, args, message):
    result = invoke("bench-hw", "--out", tmp_path / "hw.json", *TINY, *args)
    assert result.exit_code == 1 and result.stderr.startswith(message) and result.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def model(tiny_dir):
    return tiny_dir("mixtral")


def _trace(path, model, num_experts=None):
    spec = plan_checkpoint(model).spec
    experts = num_experts or spec.num_experts
    header = TraceHeader("tiny", spec.num_moe_layers, experts, spec.top_k)
    rows = [TraceRecord(0, t, "decode", tuple(tuple((t + k + layer) % experts for k in range(spec.top_k))
                                              for layer in range(spec.num_moe_layers)),
                        tuple((0.5,) * spec.top_k for _ in range(spec.num_moe_layers))) for t in range(6)]
    write_trace(path, header, rows)
    return path


def test_plan_predicts_every_budget_and_tier_and_recommends_one(model, tmp_path):
    calibration = Calibration().save(tmp_path / "hw.json")
    out = tmp_path / "plan.json"
    result = invoke("plan", model, "--trace", _trace(tmp_path / "t.jsonl", model), "--device", "cpu",
                    "--calibration", calibration, "--expert-budget", "100%,25%", "--json", out)
    assert result.exit_code == 0, result.output
    stderr = result.stderr.replace("\n", " ")
    assert "recommended: --expert-budget" in stderr and "decode tokens, global LRU" in stderr
    saved = json.loads(out.read_text())
    assert [(p["tier"], p["budget"]) for p in saved["predictions"]] == [
        ("ram", "100%"), ("ram", "25%"), ("disk", "100%"), ("disk", "25%")]
    assert saved["recommended"] in saved["predictions"] and saved["device"] == "cpu"
    assert all(p["tokens_per_s"] > 0 for p in saved["predictions"])


def test_plan_without_a_trace_assumes_uniform_routing_and_on_cuda_adds_hybrid(model, tmp_path):
    out = tmp_path / "plan.json"
    result = invoke("plan", model, "--device", "cuda", "--offload-to", "ram", "--expert-budget", "50%",
                    "--json", out)
    assert result.exit_code == 0, result.output
    assert "uniform routing" in result.stderr.replace("\n", " ")
    assert [p["hybrid"] for p in json.loads(out.read_text())["predictions"]] == ["off", "auto"]


@pytest.mark.parametrize("args, message", [
    (("--offload-to", "tape"), "Error: --offload-to 'tape': give ram, disk or ram,disk"),
    (("--device", "tpu"), "Error: unknown device 'tpu'"),
    (("--calibration", "missing.json"), "Error: --calibration missing.json does not exist"),
    (("--expert-budget", "0"), "Error: expert budget '0' must be at least 1 slot"),
])
def test_plan_bad_options_are_one_line_errors(model, args, message):
    result = invoke("plan", model, "--device", "cpu", *args)
    assert result.exit_code == 1 and result.stderr.startswith(message) and result.stderr.count("\n") == 1


def test_plan_refuses_a_trace_of_another_model(model, tmp_path):
    result = invoke("plan", model, "--device", "cpu", "--trace", _trace(tmp_path / "t.jsonl", model, num_experts=9))
    assert result.exit_code == 1 and "experts" in result.stderr and result.stderr.count("\n") == 1
