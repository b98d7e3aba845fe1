"""scripts/train_tiny_moe.py without training: every --architecture makes a checkpoint offload reads with the
asked-for shape, the balance loss scores a balanced layer top_k, and bad options or a non-empty --out end
in one line before any work is done. (A real run takes an hour: the bundled models' reports are its test.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import offload

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train_tiny_moe.py"

_spec = importlib.util.spec_from_file_location("train_tiny_moe", SCRIPT)
script = importlib.util.module_from_spec(_spec)
sys.modules["train_tiny_moe"] = script  # dataclasses look their module up while the class is made
_spec.loader.exec_module(script)

TINY = {"hidden": 32, "intermediate": 16, "layers": 2, "heads": 4, "kv_heads": 2, "max_positions": 64}


@pytest.mark.parametrize("architecture, norm, family, renormalises", [
    ("mixtral", None, "mixtral", True),
    ("olmoe", None, "olmoe", False),
    ("olmoe", True, "olmoe", True),
    ("qwen3_moe", True, "qwen3_moe", True),
])
def test_each_architecture_saves_a_checkpoint_offload_reads(tmp_path, architecture, norm, family, renormalises):
    cfg = script.TrainConfig(architecture=architecture, experts=16, top_k=4, norm_topk_prob=norm, **TINY)
    torch.manual_seed(0)
    model = script.model_class(cfg)(script.make_config(cfg, vocab_size=64, eot_id=0))
    model.save_pretrained(tmp_path)
    spec = offload.plan_checkpoint(tmp_path).spec
    assert (spec.family, spec.num_layers, spec.num_experts, spec.top_k) == (family, 2, 16, 4)
    assert (spec.hidden_size, spec.expert_intermediate_size, spec.num_kv_heads) == (32, 16, 2)
    assert spec.norm_topk_prob is renormalises and all(spec.moe_layers)
    report = script.model_report(model, "float32", tmp_path)
    expert = 3 * 32 * 16
    assert report["expert_parameters"] == 2 * 16 * expert
    # everything but the 64 x 32 embedding table and the 12 experts per layer a token does not use
    assert report["active_parameters_per_token"] == report["parameters"] - 64 * 32 - 2 * 12 * expert


def test_balance_loss_scores_a_balanced_layer_top_k():
    # 64 tokens, 8 experts, top-2; every expert is some token's first choice equally often and router
    # probabilities are uniform on average -> loss exactly top_k, shares exactly 1 / experts.
    logits = torch.full((64, 8), -4.0)
    logits[torch.arange(64), torch.arange(64) % 8] = 4.0
    logits[torch.arange(64), (torch.arange(64) + 1) % 8] = 3.0
    loss, shares = script.balance_loss([logits, logits], top_k=2)
    torch.testing.assert_close(loss, torch.tensor(2.0))
    torch.testing.assert_close(shares, torch.full((2, 8), 1 / 8))


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = script.TrainConfig(steps=200, warmup_steps=100, lr=1e-3, min_lr_ratio=0.1)
    assert script.lr_at(0, cfg) == pytest.approx(1e-5) and script.lr_at(99, cfg) == pytest.approx(1e-3)
    assert script.lr_at(200, cfg) == pytest.approx(1e-4)


@pytest.mark.parametrize("args, message", [
    (["--architecture", "llama"], "unknown --architecture 'llama'"),
    (["--no-norm-topk-prob"], "Mixtral always renormalises"),
    (["--experts", "4", "--top-k", "8"], "--top-k 8 must be between 1 and --experts 4"),
    (["--heads", "3"], "--heads must divide --hidden"),
    (["--dtype", "int8"], "unknown --dtype 'int8'"),
    (["--tokenizer", "no-such-tokenizer.json"], "is not a file"),
])
def test_bad_options_end_in_one_line(tmp_path, args, message):
    result = CliRunner().invoke(script.app, ["--out", str(tmp_path / "m"), *args])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_a_non_empty_out_is_refused_before_any_work(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(script.app, ["--out", str(tmp_path), "--threads", "1"])
    assert result.exit_code == 1 and "is not an empty directory" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    assert not tmp_path.with_name(tmp_path.name + ".partial").exists()
