"""scripts/bench_decode.py without timing anything long: its help, options, worker samples and summary schema.

The JSON this script writes is what the README's performance tables are read from, so its keys are pinned
here: a worker's sample (run in-process on a tiny checkpoint, through the hidden --worker options), the
summary's rows and ratios (summarize / paired_ratio / table on hand-made samples with worked-out medians).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from offload.checkpoint.plan import plan_checkpoint
from offload.errors import ConfigError
from tests.scripts import ROOT, SCRIPTS, load_script, script_env

bench = load_script("bench_decode")

CLOCK = {"prefill_s", "decode_tokens", "decode_s", "decode_tokens_per_s"}
WORKER = {"config", "device", "threads", "loadavg_before", "loadavg_after", "max_rss_bytes"}
OURS_SAMPLE = CLOCK | WORKER | {"load_model_s", "num_slots", "expert_format", "slot_nbytes", "total_experts", "stats",
                                "decode_cache", "busy", "new_token_ids"}
HF_SAMPLE = CLOCK | WORKER | {"load_model_s", "busy", "attn_implementation", "experts_implementation",
                              "new_token_ids"}
PARAMS = ["model", "dtype", "device", "prompt", "predictor", "lookahead", "policy", "work_dir", "hidden",
          "intermediate", "layers", "experts", "top_k", "heads", "kv_heads", "vocab", "init_range", "seed",
          "prompt_len", "new_tokens", "warmup_tokens", "repeats", "threads", "drop_ms", "configs", "quant",
          "calibration", "hybrid", "timeout", "out", "summarize", "note"]


def test_help_lists_device_and_hides_the_worker_protocol() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_decode.py"), "--help"], capture_output=True,
                          text=True, cwd=ROOT, env={**script_env(), "COLUMNS": "200"}, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    for option in ("--device", "--configs", "--repeats", "--new-tokens", "--predictor", "--summarize", "--out"):
        assert option in proc.stdout
    assert "--worker" not in proc.stdout and "--build" not in proc.stdout
    assert "cpu only" in proc.stdout  # the accelerate baseline's limit is stated


def test_configs_expand_with_the_predictor_and_drop_accelerate_on_cuda() -> None:
    assert bench.parse_configs("offload-ram-50, hf-eager", "pregate", "cpu") == (
        ["offload-ram-50", "hf-eager", "offload-ram-50+pregate"], [])
    assert bench.parse_configs(",".join(bench.CONFIGS), "none", "cuda") == (bench.CONFIGS[:-1], [bench.HF_ACCEL])
    with pytest.raises(ConfigError, match="nothing to run on cuda"):
        bench.parse_configs(bench.HF_ACCEL, "none", "cuda")
    with pytest.raises(ConfigError, match=r"unknown configurations \['offload-gpu-50'\]"):
        bench.parse_configs("offload-gpu-50", "none", "cpu")


def test_bad_options_are_one_line_errors() -> None:
    result = CliRunner().invoke(bench.app, ["--configs", "nope"])
    assert result.exit_code == 1 and result.stderr.startswith("Error: unknown configurations ['nope']")
    assert result.stderr.count("\n") == 1
    result = CliRunner().invoke(bench.app, ["--device", "tpu"])
    assert result.exit_code == 1
    assert result.stderr == "Error: unknown device 'tpu' (hint: use one of: cpu, cuda, auto)\n"


def test_schedule_runs_each_config_once_per_repeat_in_rotating_order() -> None:
    order = bench.schedule(["a", "b", "c"], 3)
    assert order == [(0, "a"), (0, "b"), (0, "c"), (1, "a"), (1, "c"), (1, "b"), (2, "c"), (2, "a"), (2, "b")]


def test_token_clock_times_decode_after_the_first_token_and_syncs_before_each_stamp() -> None:
    syncs = []
    clock = bench.TokenClock(sync=lambda: syncs.append(1))
    for value in (torch.tensor([[1, 2, 3]]), torch.tensor([4]), torch.tensor([5]), torch.tensor([6])):
        clock.put(value)
    result = clock.result()
    assert set(result) == CLOCK and result["decode_tokens"] == 2 and clock.tokens == [4, 5, 6]
    assert len(syncs) == 4


@pytest.fixture(scope="module")
def worker_samples(tiny_dir) -> dict[str, dict]:
    """One sample per runtime from the worker protocol, in-process, on a tiny bf16 Mixtral."""
    path = tiny_dir("mixtral", torch.bfloat16)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    out = {}
    for name in ("offload-disk-50", "hf-eager"):
        result = CliRunner().invoke(bench.app, ["--worker", name, "--worker-model", str(path), "--vocab", str(vocab),
                                                "--prompt-len", "4", "--new-tokens", "3", "--warmup-tokens", "1",
                                                "--threads", "1", "--drop-ms", "5"])
        assert result.exit_code == 0, result.output
        out[name] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def test_worker_samples_keep_their_keys(worker_samples, tiny_dir) -> None:
    ours, hf = worker_samples["offload-disk-50"], worker_samples["hf-eager"]
    assert set(ours) == OURS_SAMPLE | {"page_cache"} and set(hf) == HF_SAMPLE
    assert set(ours["decode_cache"]) == {*bench.DECODE_COUNTS, "read_requests"}
    reads = plan_checkpoint(tiny_dir("mixtral", torch.bfloat16)).reads_per_expert()  # each miss pays them all
    assert ours["decode_cache"]["read_requests"] == ours["decode_cache"]["misses"] * reads
    assert set(ours["page_cache"]) >= {"period_s", "drops", "resident_samples", "checkpoint"}
    assert ours["device"] == hf["device"] == "cpu" and ours["config"] == "offload-disk-50"
    assert len(ours["new_token_ids"]) == len(hf["new_token_ids"]) == 3 and ours["decode_tokens"] == 2
    assert ours["decode_cache"]["hits"] + ours["decode_cache"]["misses"] > 0


def _ours(config: str, repeat: int, tps: float, stalls: int) -> dict:
    cache = {k: 2 for k in bench.DECODE_COUNTS} | {"stalls": stalls, "stall_time_s": stalls / 10, "read_requests": 6}
    return {"config": config, "repeat": repeat, "decode_tokens_per_s": tps, "decode_tokens": 4, "decode_cache": cache,
            "stats": {"total": {"load_time_s": 0.5}, "predictor_time_s": 0.1, "decode_time_s": 0.4,
                      "prediction": {"1": {"precision": 0.75, "recall": 0.5}}},
            "max_rss_bytes": 2**30, "busy": {"other_processes_cores": 0.25}, "new_token_ids": [5, 6, 7, 8]}


def _hf(config: str, repeat: int, tps: float) -> dict:
    return {"config": config, "repeat": repeat, "decode_tokens_per_s": tps, "max_rss_bytes": 2**31,
            "busy": {"other_processes_cores": 0.5}, "new_token_ids": [5, 6, 9, 9]}


CONFIGS = ["offload-ram-100", "offload-disk-25", "offload-ram-50", "hf-eager", "hf-accelerate-disk",
           "offload-ram-50+pregate"]
SAMPLES = [_ours("offload-ram-100", 0, 10.0, 0) | {"predicted_tokens_per_s": 15.0},
           _ours("offload-ram-100", 1, 30.0, 0) | {"predicted_tokens_per_s": 24.0},
           _ours("offload-disk-25", 0, 4.0, 8), _ours("offload-disk-25", 1, 2.0, 8),
           _ours("offload-ram-50", 0, 8.0, 8), _ours("offload-ram-50", 1, 8.0, 4),
           _ours("offload-ram-50+pregate", 0, 4.0, 2), _ours("offload-ram-50+pregate", 1, 6.0, 2),
           _hf("hf-eager", 0, 5.0), _hf("hf-eager", 1, 10.0), _hf("hf-accelerate-disk", 0, 1.0),
           {"config": "hf-accelerate-disk", "repeat": 1, "error": "worker exited 1", "stderr_tail": "..."}]


def test_summary_rows_and_ratios_keep_their_keys_and_values() -> None:
    summary = bench.summarize(SAMPLES, CONFIGS, 2)
    rows = summary["configs"]
    assert list(rows) == CONFIGS
    cache_keys = [f"decode_{k}" for k in bench.DECODE_COUNTS] + [
        "total_load_time_s", "decode_misses_per_token", "decode_mib_per_miss", "decode_reads_per_miss",
        "decode_stalls_per_token"]
    model = ["predicted_tokens_per_s", "predicted_over_measured"]
    tail = ["max_rss_bytes", "other_processes_cores", "tokens_match_hf_eager"]
    assert list(rows["offload-ram-100"]) == ["decode_tokens_per_s", "failed", *cache_keys, *model, *tail]
    predicted = ["precision_lookahead_1", "recall_lookahead_1", "predictor_share_of_decode"]
    assert list(rows["offload-ram-50+pregate"]) == ["decode_tokens_per_s", "failed", *cache_keys, *predicted, *model,
                                                    *tail]
    # predicted 15 and 24 tok/s against measured 10 and 30: ratios 1.5 and 0.8 per sample
    assert rows["offload-ram-100"]["predicted_tokens_per_s"] == {"median": 19.5, "min": 15.0, "max": 24.0, "n": 2}
    assert rows["offload-ram-100"]["predicted_over_measured"] == {"median": 1.15, "min": 0.8, "max": 1.5, "n": 2}
    assert rows["offload-ram-50"]["predicted_tokens_per_s"] == {}  # a run without a calibration's prediction
    assert list(rows["hf-eager"]) == ["decode_tokens_per_s", "failed", *tail]
    assert rows["offload-ram-100"]["decode_tokens_per_s"] == {"median": 20.0, "min": 10.0, "max": 30.0, "n": 2}
    assert rows["hf-accelerate-disk"]["failed"] == 1 and rows["hf-accelerate-disk"]["decode_tokens_per_s"]["n"] == 1
    assert rows["offload-ram-50"]["decode_stalls_per_token"]["median"] == 1.5  # (8 / 4 + 4 / 4) / 2
    assert rows["offload-ram-50+pregate"]["predictor_share_of_decode"]["median"] == 0.25
    assert rows["offload-disk-25"]["tokens_match_hf_eager"] == [2, 2]  # [5, 6, 7, 8] vs [5, 6, 9, 9]
    assert list(summary["ratios"]) == [
        "offload-ram-100 / hf-eager", "offload-disk-25 / hf-accelerate-disk",
        "offload-ram-50+pregate / offload-ram-50", "offload-ram-50+pregate / offload-ram-50: stalls_per_token",
        "offload-ram-50+pregate / offload-ram-50: stall_time_s"]
    # paired within a repeat: 10 / 5 and 30 / 10, then the median; of medians: 20 / 7.5
    assert summary["ratios"]["offload-ram-100 / hf-eager"] == {"median": 2.5, "min": 2.0, "max": 3.0, "n": 2,
                                                               "of_medians": 20 / 7.5}
    assert "offload-disk-100 / hf-eager" not in summary["ratios"]  # not run
    assert summary["ratios"]["offload-disk-25 / hf-accelerate-disk"]["n"] == 1  # repeat 1 failed
    stalls = summary["ratios"]["offload-ram-50+pregate / offload-ram-50: stalls_per_token"]
    assert (stalls["min"], stalls["max"]) == (0.25, 0.5)  # 2 / 8 and 2 / 4 stalls per 4 tokens


def test_paired_ratio_pairs_by_repeat_and_skips_zeros() -> None:
    ours = [{"repeat": 0, "decode_tokens_per_s": 6.0}, {"repeat": 2, "decode_tokens_per_s": 9.0}]
    theirs = [{"repeat": 0, "decode_tokens_per_s": 3.0}, {"repeat": 1, "decode_tokens_per_s": 1.0},
              {"repeat": 2, "decode_tokens_per_s": 0.0}]
    assert bench.paired_ratio(ours, theirs, 3) == {"median": 2.0, "min": 2.0, "max": 2.0, "n": 1, "of_medians": 7.5}
    assert bench.paired_ratio([], theirs, 3) == {}
    assert bench.paired_ratio(ours, theirs[2:], 3) == {}  # nothing to divide by: no ratio, no crash


def test_table_prints_every_config_prefetch_rows_and_targets() -> None:
    text = bench.table(bench.summarize(SAMPLES, CONFIGS, 2))
    lines = text.splitlines()
    assert lines[0].startswith("| configuration | decode tok/s median [min–max] | vs HF eager |")
    assert ("| offload-ram-100 | 20.00 [10.00–30.00] | 2.67x | 2 [2–2] | 2 [2–2] | 0.50 [0.50–0.50] | 0.0 [0.0–0.0] "
            "| 3.00 [3.00–3.00] | 0.00 [0.00–0.00] | 0.00 [0.00–0.00] | 1.00 [1.00–1.00] | 0.25 [0.25–0.25] "
            "| 19.50 [15.00–24.00] | 1.15 [0.80–1.50] |") in text
    assert "| offload-ram-50 | 8.00 [8.00–8.00] | 1.07x |" in text and "| n/a | n/a |\n" in text
    assert "| hf-eager | 7.50 [5.00–10.00] | 1.00x | – | – | – | – | – | – | – | 2.00 [2.00–2.00] | 0.50 [0.50–0.50] " \
           "| – | – |" in text
    assert "| offload-ram-50+pregate | 0.50 [0.50–0.50] | 0.200 [0.200–0.200] | 2 [2–2] / 2 [2–2] / 2 [2–2] " \
           "| 0.75 [0.75–0.75] | 0.50 [0.50–0.50] | 25.0 [25.0–25.0]% |" in text
    assert "| offload-ram-100 / hf-eager | 2.50 [2.00–3.00]x | 2.67x | >= 1.0x |" in text
    assert "| offload-ram-50+pregate / offload-ram-50: stalls_per_token | 0.38 [0.25–0.50]x | 0.33x " \
           "| <= 0.5x (50% budget, pregate) |" in text


def test_params_are_every_option_but_the_worker_protocol(tmp_path) -> None:
    opts = bench.Options(**{name: None for name in PARAMS} | {"work_dir": tmp_path, "configs": ["hf-eager"],
                                                               "note": []}, worker="hf-eager", build=True)
    params = opts.params()
    assert list(params) == PARAMS and params["work_dir"] == str(tmp_path)


def test_summarize_recomputes_and_appends_notes(tmp_path) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"params": {"configs": CONFIGS, "repeats": 2}, "samples": SAMPLES, "notes": ["a"]}))
    result = CliRunner().invoke(bench.app, ["--summarize", str(path), "--note", "b", "--note", "c"])
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    assert data["notes"] == ["a", "b", "c"] and data["summary"] == bench.summarize(SAMPLES, CONFIGS, 2)
    assert result.stdout == bench.table(data["summary"]) + "\n"


def test_the_prediction_beside_an_offload_sample_uses_its_measured_misses(worker_samples, tiny_dir, tmp_path):
    from offload.hw.calibration import Calibration
    from offload.hw.perfmodel import token_cost

    calibration = Calibration(host_memory_bandwidth=5e9, disk_read_bandwidth=1e8).save(tmp_path / "hw.json")
    opts = bench.Options(**{name: None for name in PARAMS} | {
        "work_dir": tmp_path, "configs": [], "note": [], "device": "cpu", "dtype": "bfloat16",
        "calibration": calibration, "hybrid": "off"})
    predicted = bench.Predicted(opts, tiny_dir("mixtral", torch.bfloat16))
    sample = worker_samples["offload-disk-50"]
    misses = sample["decode_cache"]["misses"] / sample["decode_tokens"]
    expected = token_cost(predicted.sizes("offload-disk-50"), Calibration.load(calibration), "cpu", "disk", misses)
    assert predicted(sample) == pytest.approx(expected.tokens_per_s)
    assert predicted(worker_samples["hf-eager"]) is None
    assert predicted({"config": "offload-ram-50", "error": "x"}) is None
    assert predicted.to_json()["source"] == str(calibration) and predicted.to_json()["measured"] == []


def test_summarize_with_a_calibration_repredicts_every_offload_sample(worker_samples, tiny_dir, tmp_path):
    from offload.hw.calibration import Calibration

    model = tiny_dir("mixtral", torch.bfloat16)
    slow, fast = (Calibration(host_memory_bandwidth=5e9, disk_read_bandwidth=bw).save(tmp_path / f"hw{bw:.0e}.json")
                  for bw in (1e7, 1e9))
    params = {name: None for name in PARAMS} | {
        "work_dir": str(tmp_path), "configs": ["offload-disk-50", "hf-eager"], "note": [], "device": "cpu",
        "dtype": "bfloat16", "hybrid": "off", "repeats": 1, "out": str(tmp_path / "run.json"), "quant": ""}
    samples = [dict(worker_samples["offload-disk-50"], repeat=0), dict(worker_samples["hf-eager"], repeat=0)]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"params": params, "model": {"path": str(model)}, "samples": samples}))
    wants = []
    for cal in (slow, fast):
        result = CliRunner().invoke(bench.app, ["--summarize", str(path), "--calibration", str(cal)])
        assert result.exit_code == 0, result.output
        data = json.loads(path.read_text())
        opts = bench.Options(**{**params, "work_dir": tmp_path, "calibration": cal, "out": path})
        wants.append(want := bench.Predicted(opts, model)(samples[0]))
        assert data["samples"][0]["predicted_tokens_per_s"] == pytest.approx(want)
        assert "predicted_tokens_per_s" not in data["samples"][1] and data["calibration"]["source"] == str(cal)
        assert data["notes"][-1].startswith("predicted_tokens_per_s recomputed from " + str(cal))
    assert data["summary"]["configs"]["offload-disk-50"]["predicted_tokens_per_s"]["median"] == pytest.approx(want)
    assert wants[0] < wants[1]  # a faster disk predicts a faster decode: the calibration was really used
    result = CliRunner().invoke(bench.app, ["--summarize", str(path), "--calibration", str(tmp_path / "none.json")])
    assert result.exit_code != 0 and "does not exist" in result.output
