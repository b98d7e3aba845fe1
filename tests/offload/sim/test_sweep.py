"""offload/sim/sweep.py: capacities as written by users, records, tables."""

from __future__ import annotations

import numpy as np
import pytest

from offload.errors import ConfigError
from offload.sim.simulate import AccessStream, simulate
from offload.sim.sweep import SweepConfig, markdown_tables, parse_capacities, sweep


def test_capacity_specs_mix_counts_ranges_and_shares() -> None:
    specs = parse_capacities("1-3, 64,12.5%")
    assert [s.text for s in specs] == ["1", "2", "3", "64", "12.5%"]
    assert [s.resolve(256) for s in specs] == [1, 2, 3, 64, 32] and specs[-1].label(256) == "12.5% (32)"
    assert parse_capacities("1%")[0].resolve(8) == 1  # a share never rounds down to an empty cache


@pytest.mark.parametrize("spec", ["0", "7-3", "-1", "abc", "0%"])
def test_bad_capacities_name_the_part(spec) -> None:
    with pytest.raises(ConfigError, match="bad capacity"):
        parse_capacities(spec)


def test_sweep_records_are_the_simulators_counts() -> None:
    rng = np.random.default_rng(0)
    stream = AccessStream.from_experts(np.argsort(rng.random((50, 3, 4)), axis=2)[:, :, :2], 4)
    config = SweepConfig(policies=("lru", "belady"), per_layer=parse_capacities("1-2"), global_=parse_capacities("50%"))
    records = list(sweep("synthetic", stream, config))
    assert len(records) == config.runs_per_trace() == 6
    for r in records:
        expected = simulate(stream, r.policy, r.scope, r.capacity)
        assert (r.hits, r.misses, r.evictions) == (expected.hits, expected.misses, expected.evictions)
    table = markdown_tables(records)
    assert "| 50% (6) |" in table and "belady" in table
