"""Cache-policy sweeps: every policy at every capacity over a trace, as records, tables and a plot.

The reusable half of ``scripts/sweep_cache_policy.py`` (which only parses flags and writes files),
so the CLI, notebooks and tests get the same records and the same table.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offload.amounts import Amount
from offload.errors import BudgetError, ConfigError
from offload.sim.simulate import SIM_POLICIES, AccessStream, check_policy, simulate

SCHEMA = "offload-sweep/1"
_RANGE = re.compile(r"^(\d+)-(\d+)$")


@dataclass(frozen=True)
class CapacitySpec:
    """A capacity as the user wrote it: an expert count (``64``) or a share of the cache's keys (``25%``)."""

    text: str

    def resolve(self, keys: int) -> int:
        """Experts for a cache that could hold ``keys`` (8 per layer for Mixtral, 256 globally).

        A share rounds to the nearest count and never to an empty cache (what the reference table uses).
        """
        amount = Amount.parse(self.text, "capacity", _HINT, sizes=False)
        return max(1, round(amount.value / 100 * keys)) if amount.kind == "share" else int(amount.value)

    def label(self, keys: int) -> str:
        return f"{self.text} ({self.resolve(keys)})" if self.text.endswith("%") else self.text


_HINT = "write counts, ranges or shares: 1-7, 64,128, 25%"


def parse_capacities(spec: str) -> tuple[CapacitySpec, ...]:
    """``"1-7"``, ``"2,4,6"``, ``"25%,50%"`` (mixed is fine) -> capacities; an empty spec sweeps none."""
    out: list[CapacitySpec] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        span = _RANGE.match(part)
        if span and 1 <= int(span.group(1)) <= int(span.group(2)):
            out += [CapacitySpec(str(c)) for c in range(int(span.group(1)), int(span.group(2)) + 1)]
            continue
        try:
            amount = Amount.parse(part, "capacity", _HINT, sizes=False)
        except BudgetError:
            amount = Amount("count", 0)
        if amount.value <= 0 or (amount.kind == "count" and not part.isdigit()):
            raise ConfigError(f"bad capacity {part!r} in {spec!r}", _HINT)
        out.append(CapacitySpec(part))
    return tuple(out)


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep; with ``expert_bytes`` (and ``bandwidth_gbps``) misses become bytes (and seconds)."""

    policies: tuple[str, ...] = tuple(SIM_POLICIES)
    per_layer: tuple[CapacitySpec, ...] = parse_capacities("1-7")
    global_: tuple[CapacitySpec, ...] = parse_capacities("25%,50%,75%")
    expert_bytes: int | None = None
    """Bytes of one expert (all its matrices), what one miss moves."""
    bandwidth_gbps: float | None = None
    """Host-to-device bandwidth in GB/s (1e9 bytes/s) that bounds a transfer."""

    def __post_init__(self) -> None:
        if not self.policies or not (self.per_layer or self.global_):
            raise ConfigError("nothing to sweep", "name at least one policy and one per-layer or global capacity")
        for policy in self.policies:
            check_policy(policy)
        if self.expert_bytes is not None and self.expert_bytes <= 0:
            raise ConfigError(f"--expert-bytes must be > 0, got {self.expert_bytes}")
        if self.bandwidth_gbps is not None and (self.bandwidth_gbps <= 0 or self.expert_bytes is None):
            raise ConfigError("--bandwidth needs a value > 0 and --expert-bytes", "e.g. --expert-bytes 352321536 "
                              "--bandwidth 25 for a bf16 Mixtral expert over PCIe 4")

    def runs_per_trace(self) -> int:
        return len(self.policies) * (len(self.per_layer) + len(self.global_))


@dataclass(frozen=True)
class SweepRecord:
    """One (trace, policy, scope, capacity) point; the rows of sweep.json and sweep.csv."""

    trace: str
    policy: str
    scope: str  # "per-layer" | "global"
    capacity: int  # experts per layer (per-layer) or keys in all (global)
    capacity_label: str  # as asked: "3", "25% (64)"
    tokens: int
    accesses: int
    hits: int
    misses: int
    evictions: int
    hit_rate: float
    bytes_per_token: float | None = None
    transfer_s_per_token: float | None = None


def sweep(name: str, stream: AccessStream, config: SweepConfig) -> Iterator[SweepRecord]:
    """Simulate every (scope, capacity, policy) of ``config`` on one trace, yielding as it goes."""
    scopes = (("per-layer", config.per_layer, stream.num_experts), ("global", config.global_, stream.num_keys))
    for scope, capacities, keys in scopes:
        for spec in capacities:
            for policy in config.policies:
                r = simulate(stream, policy, scope, spec.resolve(keys))
                moved = None if config.expert_bytes is None else r.misses_per_token * config.expert_bytes
                seconds = None if config.bandwidth_gbps is None else moved / (config.bandwidth_gbps * 1e9)
                yield SweepRecord(name, policy, scope, r.capacity, spec.label(keys), r.num_tokens, r.accesses,
                                  r.hits, r.misses, r.evictions, r.hit_rate, moved, seconds)


# ------------------------------------------------------------------------------------------ outputs


def to_json(records: Sequence[SweepRecord], **meta: Any) -> dict[str, Any]:
    """sweep.json: ``{"schema", "records": [...], **meta}``; the records are always under "records"."""
    return {"schema": SCHEMA, "records": [dataclasses.asdict(r) for r in records], **meta}


def write_csv(records: Sequence[SweepRecord], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(SweepRecord)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in records)


def _pivot(records: Sequence[SweepRecord], title: str, cell: Callable[[SweepRecord], str]) -> list[str]:
    """One Markdown table per (trace, scope): capacities down, policies across."""
    out: list[str] = []
    for trace in dict.fromkeys(r.trace for r in records):
        for scope in ("per-layer", "global"):
            rows = [r for r in records if r.trace == trace and r.scope == scope]
            if not rows:
                continue
            policies = list(dict.fromkeys(r.policy for r in rows))
            head = "C (experts per layer)" if scope == "per-layer" else "K (keys in all)"
            grid: dict[str, dict[str, str]] = {}
            for r in rows:
                grid.setdefault(r.capacity_label, {})[r.policy] = cell(r)
            out += [f"**{trace}**, {scope} cache, {title}", "", f"| {head} | " + " | ".join(policies) + " |",
                    "|---" * (len(policies) + 1) + "|"]
            out += [f"| {label} | " + " | ".join(cells.get(p, "") for p in policies) + " |"
                    for label, cells in grid.items()]
            out.append("")
    return out


def markdown_tables(records: Sequence[SweepRecord]) -> str:
    """Hit rates to 4 decimals, then MB and transfer-bound ms per token when those were asked for."""
    lines = _pivot(records, "hit rate", lambda r: f"{r.hit_rate:.4f}")
    if records and records[0].bytes_per_token is not None:
        lines += _pivot(records, "MB moved per token", lambda r: f"{r.bytes_per_token / 1e6:,.1f}")
    if records and records[0].transfer_s_per_token is not None:
        lines += _pivot(records, "transfer-bound ms per token", lambda r: f"{r.transfer_s_per_token * 1e3:,.2f}")
    return "\n".join(lines).rstrip() + "\n"


def plot_sweep(records: Sequence[SweepRecord], path: Path) -> None:
    """Hit rate vs capacity, one line per policy (Belady, the optimum, dashed); a row per trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(dict.fromkeys(r.trace for r in records))
    policies = list(dict.fromkeys(r.policy for r in records))
    colors = {p: f"C{i}" for i, p in enumerate(SIM_POLICIES)}  # a policy keeps its colour across plots
    fig, axes = plt.subplots(len(traces), 2, figsize=(11, 4.2 * len(traces)), squeeze=False)
    for row, trace in enumerate(traces):
        for ax, scope in zip(axes[row], ("per-layer", "global")):
            rows = [r for r in records if r.trace == trace and r.scope == scope]
            for policy in policies:
                points = sorted((r.capacity, r.hit_rate) for r in rows if r.policy == policy)
                if points:
                    ax.plot(*zip(*points), marker="o", color=colors[policy], label=policy,
                            linestyle="--" if policy == "belady" else "-")
            ticks = dict(sorted((r.capacity, r.capacity_label.replace(" ", "\n")) for r in rows))  # one per x
            ax.set_xticks(list(ticks), list(ticks.values()))
            ax.set_xlabel("experts cached per layer" if scope == "per-layer" else "(layer, expert) keys cached")
            ax.set_ylabel("hit rate")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.set_title(f"{trace}: {scope} cache ({rows[0].accesses:,} accesses)" if rows else trace, fontsize=10)
            ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
