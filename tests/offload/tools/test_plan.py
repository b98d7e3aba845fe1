"""offload/tools/plan.py: the planner's sizes and fits come from the same fit check as ``--expert-budget auto``
and ``offload info``, so for the same free memory all three name the same budget."""

from __future__ import annotations

import re
import shutil
from collections import namedtuple

import pytest
import torch
from typer.testing import CliRunner

import offload.hw.machine
from cli.main import app
from offload.checkpoint.plan import plan_checkpoint, plan_config
from offload.memory.budget import Placement, memory_plan
from offload.runtime.config import RuntimeConfig
from offload.runtime.load import fit_runtime_budget
from offload.tools.plan import auto_slots, fits_for
from tests.paths import DATA

MiB = 2**20
VM = namedtuple("VM", "total available")


def _mock_ram(monkeypatch, available: int) -> None:
    monkeypatch.setattr(offload.hw.machine.psutil, "virtual_memory", lambda: VM(2**36, available))


@pytest.mark.parametrize("extra_slots", [0, 3, 7])
def test_info_plan_and_auto_name_the_same_budget(tiny_dir, monkeypatch, extra_slots):
    plan = plan_checkpoint(tiny_dir("mixtral"))
    cpu = torch.device("cpu")
    placement = Placement(cpu, torch.float32, "ram")
    # free memory that leaves room for exactly ``extra_slots`` slots after dense, KV, RAM tier and headroom
    _mock_ram(monkeypatch, 10**12)
    base = memory_plan(plan, placement)
    _mock_ram(monkeypatch, base.resident - base.headroom + 512 * MiB + extra_slots * base.slot_nbytes + 10)
    auto = auto_slots(plan, placement)
    assert auto == extra_slots
    # plan: the budget of ``auto`` slots fits, one more does not
    fits = fits_for(plan, "cpu", torch.float32)
    assert fits("ram", auto) and not fits("ram", auto + 1)
    # run's auto (from_pretrained's fit check) takes the same, or refuses when none fits
    if auto:
        config = fit_runtime_budget(plan, RuntimeConfig(expert_budget="auto", offload_to="ram"), torch.float32, cpu)
        assert config.expert_budget == auto


def test_info_suggests_what_auto_takes_or_says_why_nothing_fits(tiny_dir, monkeypatch):
    runner = CliRunner()
    plan = plan_checkpoint(tiny_dir("mixtral"))
    _mock_ram(monkeypatch, 10**12)
    base = memory_plan(plan, Placement(torch.device("cpu"), torch.float32))
    _mock_ram(monkeypatch, base.resident - base.headroom + 512 * MiB + 5 * base.slot_nbytes + 10)
    out = runner.invoke(app, ["info", str(tiny_dir("mixtral"))])
    assert out.exit_code == 0, out.output
    text = " ".join(out.stdout.split())
    assert "--expert-budget 5 (what auto takes)" in text
    config = fit_runtime_budget(plan, RuntimeConfig(expert_budget="auto"), torch.float32, torch.device("cpu"))
    assert config.expert_budget == 5
    _mock_ram(monkeypatch, 100 * MiB)  # under the headroom alone
    out = runner.invoke(app, ["info", str(tiny_dir("mixtral"))])
    text = " ".join(out.stdout.split())
    assert out.exit_code == 0 and "does not fit: dense weights" in text and "cannot hold" in text


@pytest.mark.parametrize("config", sorted(p.stem for p in (DATA / "configs").glob("*.json")))
def test_info_on_every_released_config_gives_a_valid_budget_or_the_numbers(tmp_path, monkeypatch, config):
    shutil.copy(DATA / "configs" / f"{config}.json", tmp_path / "config.json")
    for free in (8 * 2**30, 24 * 2**30, 96 * 2**30):
        _mock_ram(monkeypatch, free)
        out = CliRunner().invoke(app, ["info", str(tmp_path)])
        assert out.exit_code == 0, out.output
        text = " ".join(out.stdout.split())
        line = re.search(r"fits in RAM (.*)", text).group(1)
        if "does not fit" in line:
            assert re.search(r"dense weights [\d.]+ GiB .*(cannot hold|less than one expert)", line), line
        else:
            slots = int(re.search(r"--expert-budget (\d+) \(what auto takes\)", line).group(1))
            plan = plan_config(tmp_path)
            assert 1 <= slots <= plan.spec.total_experts  # never 0, never more than every expert
            mp = memory_plan(plan, Placement(torch.device("cpu"), plan.spec.checkpoint_dtype))
            assert slots == mp.slots and mp.for_experts >= slots * mp.slot_nbytes  # headroom kept
