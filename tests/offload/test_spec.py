"""offload/spec.py: budgets as users write them, RuntimeConfig rejecting every bad name and budget
before any I/O, and ModelSpec refusing config fields that contradict each other."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

import offload
from offload.amounts import Amount, parse_budget, parse_prefetch_budget
from offload.errors import BudgetError, CheckpointError, ConfigError, PolicyError
from offload.runtime.config import RuntimeConfig


def test_budget_parsing():
    assert parse_budget(16, 64, 100) == 16
    assert parse_budget("25%", 64, 100) == 16
    assert parse_budget("100%", 64, 100) == 64
    assert parse_budget("1KiB", 64, 100) == 10
    assert parse_budget("1 GiB", 64, 100) == 64  # a size beyond the model is clamped to every expert
    assert parse_budget(1000, 64, 100) == 64


def test_amounts_keep_what_the_user_wrote():
    assert Amount.parse("25%", "x", "") == Amount("share", 25.0) and Amount.parse(7, "x", "") == Amount("count", 7)
    assert Amount.parse("64MiB", "x", "") == Amount("bytes", 64 * 2**20)
    assert Amount("share", 12.5).of(40) == 5 and Amount("count", 3).of(40) == 3
    with pytest.raises(BudgetError, match="cannot parse prefetch budget '1GiB'"):
        parse_prefetch_budget("1GiB", 10)  # prefetch budgets are slots or shares, never sizes


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(policy="mru"), PolicyError, "unknown eviction policy 'mru'"),
    (dict(predictor="oracle"), ConfigError, "unknown predictor 'oracle'"),
    (dict(scheduler="random"), ConfigError, "unknown scheduler 'random'"),
    (dict(offload_to="tape"), ConfigError, "unknown --offload-to 'tape'"),
    (dict(device="tpu"), ConfigError, "unknown device 'tpu'"),
    (dict(dtype="int3"), ConfigError, "unknown dtype 'int3'"),
    (dict(expert_budget="lots"), BudgetError, "cannot parse expert budget"),
    (dict(expert_budget="120%"), BudgetError, "over 100%"),
    (dict(prefetch_budget="x"), BudgetError, "cannot parse prefetch budget"),
    (dict(lookahead=0), ConfigError, "--lookahead"),
    (dict(batch_size=0), ConfigError, "--batch-size"),
    (dict(max_wait=-1), ConfigError, "--max-wait"),
    (dict(hybrid="sometimes"), ConfigError, "invalid --hybrid 'sometimes'"),
])
def test_runtime_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        RuntimeConfig(**kwargs)
    assert "\n" not in str(info.value) and info.value.hint


def test_runtime_config_normalises_dtype_and_is_frozen():
    config = RuntimeConfig(dtype="bf16", predictor="PreGate", policy="LFU")
    assert config.dtype is torch.bfloat16 and RuntimeConfig(dtype="auto").dtype is None
    assert config.hybrid == "off" and RuntimeConfig(hybrid="auto").hybrid == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.policy = "lru"  # type: ignore[misc]


def test_bad_options_fail_before_the_checkpoint_is_read(tmp_path):
    # The path does not exist: had anything been read, the error would be about the missing folder.
    with pytest.raises(PolicyError, match="mru"):
        offload.from_pretrained(tmp_path / "missing", policy="mru")
    with pytest.raises(BudgetError, match="cannot parse"):
        offload.from_pretrained(tmp_path / "missing", expert_budget="much")


def _with_config(tiny_dir, tmp_path, **changes):
    dst = shutil.copytree(tiny_dir("mixtral"), tmp_path / "m")
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, match", [
    (dict(num_key_value_heads=3), "num_key_value_heads=3 does not divide num_attention_heads=4"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok=9 exceeds the 4 experts"),
    (dict(num_attention_heads=0, num_key_value_heads=None), "num_attention_heads=0 must be > 0"),
    (dict(num_hidden_layers=0), "num_hidden_layers=0 must be > 0"),
    (dict(sliding_window=-4), "sliding_window must be > 0"),
])
def test_contradictory_config_fields_are_named(tiny_dir, tmp_path, changes, match):
    path = _with_config(tiny_dir, tmp_path, **changes)
    with pytest.raises(CheckpointError, match=match) as info:
        offload.plan_checkpoint(path)
    assert str(path / "config.json") in info.value.message


def test_per_layer_lists_must_fit_the_layer_count(tiny_dir, tmp_path):
    import tests.tiny_models  # noqa: F401

    path = shutil.copytree(tiny_dir("qwen2_moe"), tmp_path / "q")
    cfg = json.loads((path / "config.json").read_text())
    cfg["mlp_only_layers"] = [7]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mlp_only_layers names layer 7, outside 0..2"):
        offload.plan_checkpoint(path)
