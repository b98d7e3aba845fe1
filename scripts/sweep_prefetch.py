"""Eviction policy x predictor x cache size with prefetching, beside Belady, on workloads the predictor never saw.

    python scripts/sweep_prefetch.py \\
        --workload tests/data/mixtral-8x7b-humaneval.jsonl.gz@0 \\
        --workload tests/data/mixtral-8x7b-humaneval.jsonl.gz@1 \\
        --workload scripts/results/traces/tiny-moe-stdlib-heldout.jsonl.gz \\
        --workload scripts/results/traces/tiny-moe-stdlib-prose.jsonl.gz \\
        --policies lru,fifo,layer-lru,predictive,layer-budget --predictors none,markov,learned \\
        --capacity 25%,50% --latency 2 --lookahead 2 --candidates 1x,2x --out scripts/results/prefetch

Splits are eval_predictors.py's: ``--train``/``--test`` pairs, and every ordered pair of two
``--workload`` traces of one model (``PATH@SEQS`` keeps those sequences). Per split, markov is fit
and learned trained on the train trace only; each run replays the test trace through one global
cache (``--capacity``: shares of layers x experts, or counts) in the runtime's pinned layer steps
(``--no-pin-steps``: access by access), the predictor proposing ``--candidates`` experts (``1x``:
the model's top-k, ``2x`` twice that, or counts) for each of the next ``--lookahead`` layers after
every layer step (past the last layer: the next token's first layers; ``--no-across-tokens``: none),
and learning online. A prefetch lands ``--latency`` layer steps after it is
issued; a demand access that finds it still in flight is a stall.

Reported per run: the effective hit rate ``1 - (misses + stalls) / accesses`` (the share of
accesses served without waiting), misses, stalls, loads per token (misses + prefetches: what the
transfers cost) and the demand misses by what had evicted the key (PrefetchResult.miss_causes).
Beside them, per split and capacity: Belady's demand-only hit rate (MIN, access by access, the
reference table's definition) and LRU's. ``meets`` is true when the effective hit rate reaches
Belady's.

Writes OUT/prefetch.json (``"belady"`` and ``"runs"`` record lists, every parameter, the machine;
``"fitted"``: the predictors' fits) and OUT/prefetch.md (one table per split, and the best run per
split and capacity), also printed on stdout.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from common import err, machine_info, main, make_app, progress_bar, write_json, write_text
from eval_predictors import Split, factories, make_splits  # a sibling script, as eval_predictors imports its own

from offload.errors import ConfigError
from offload.sim.simulate import check_policy, simulate, simulate_prefetch
from offload.sim.sweep import parse_capacities
from predictors import Predictor
from predictors.evaluate import PrefetchAdapter, shape_of
from predictors.learned import TrainConfig

SCHEMA = "offload-prefetch-sweep/1"
app = make_app(__doc__.splitlines()[0])


@dataclass(frozen=True)
class Baseline:
    """Demand-only hit rates of one split's test trace at one capacity."""

    split: str
    capacity: int
    capacity_label: str
    belady: float
    lru: float
    lru_pinned: float  # LRU in the runtime's pinned layer steps


@dataclass(frozen=True)
class Run:
    """One simulate_prefetch run."""

    split: str
    capacity: int
    capacity_label: str
    policy: str
    predictor: str  # "none": demand only
    lookahead: int  # 0 without a predictor
    candidates: int  # experts proposed per predicted layer
    top_k: int  # the model's
    latency: int
    pin_steps: bool
    tokens: int
    accesses: int
    misses: int
    stalls: int
    issued: int
    used: int
    wasted: int
    effective_hit_rate: float
    loads_per_token: float
    belady: float  # Belady's demand-only hit rate at this capacity
    meets: bool  # effective_hit_rate >= belady
    miss_causes: dict[str, int]


@dataclass(frozen=True)
class Grid:
    """What to run on every split."""

    policies: list[str]
    predictors: list[str]
    capacities: str
    lookahead: int
    candidates: list[str]  # "1x" (top-k), "2x", or counts
    latency: int
    pin_steps: bool
    across_tokens: bool

    def runs_per_split(self) -> int:
        with_prediction = sum(p != "none" for p in self.predictors) * len(self.candidates)
        return len(parse_capacities(self.capacities)) * len(self.policies) * (("none" in self.predictors)
                                                                             + with_prediction)


def baselines(split: Split, grid: Grid) -> list[Baseline]:
    shape = shape_of(split.test)
    keys = shape.num_layers * shape.num_experts
    out = []
    for spec in parse_capacities(grid.capacities):
        c = spec.resolve(keys)
        out.append(Baseline(split.name, c, spec.label(keys), simulate(split.test, "belady", "global", c).hit_rate,
                            simulate(split.test, "lru", "global", c).hit_rate,
                            simulate(split.test, "lru", "global", c, pin_steps=True).hit_rate))
    return out


def _runs(grid: Grid, build: dict[str, Callable[[], Predictor]],
          top_k: int) -> list[tuple[str, int, Callable | None]]:
    """(predictor name, candidates, factory or None) of every run at one (capacity, policy)."""
    out: list[tuple[str, int, Callable | None]] = [("none", 0, None)] if "none" in grid.predictors else []
    ks = list(dict.fromkeys(candidates_for(k, top_k) for k in grid.candidates))
    return out + [(name, k, build[name]) for name in grid.predictors if name != "none" for k in ks]


def sweep_split(split: Split, grid: Grid, build: dict[str, Callable[[], Predictor]],
                advance: Callable[[], None]) -> tuple[list[Baseline], list[Run]]:
    base = baselines(split, grid)
    top_k = shape_of(split.test).top_k
    runs = []
    for b in base:
        for policy in grid.policies:
            for name, k, make in _runs(grid, build, top_k):
                adapter = None if make is None else PrefetchAdapter(make(), grid.lookahead, k, seq=split.test.seq,
                                                                    across_tokens=grid.across_tokens)
                r = simulate_prefetch(split.test, policy, "global", b.capacity, predictor=adapter,
                                      latency=grid.latency, pin_steps=grid.pin_steps)
                eff = r.effective_hit_rate
                runs.append(Run(split.name, b.capacity, b.capacity_label, policy, name,
                                grid.lookahead if adapter else 0, k, top_k, grid.latency,
                                grid.pin_steps, r.sim.num_tokens, r.sim.accesses, r.sim.misses, r.stalls, r.issued,
                                r.used, r.wasted, eff, r.loads / r.sim.num_tokens, b.belady, eff >= b.belady,
                                dict(r.miss_causes)))
                advance()
    return base, runs


# ------------------------------------------------------------------------------------ tables


def split_table(base: list[Baseline], runs: list[Run]) -> str:
    """Effective hit rate (loads per token) per run, a column per capacity, Belady and LRU on top."""
    caps = [(b.capacity, b.capacity_label) for b in base]
    head = "| policy | predictor | " + " | ".join(label for _, label in caps) + " |"
    lines = [head, "|---" * (2 + len(caps)) + "|",
             "| **Belady** (demand only) | - | " + " | ".join(f"**{b.belady:.3f}**" for b in base) + " |",
             "| lru (demand only, access by access) | - | " + " | ".join(f"{b.lru:.3f}" for b in base) + " |"]
    rows: dict[tuple[str, str], dict[int, Run]] = {}
    for r in runs:
        label = r.predictor if r.predictor == "none" else f"{r.predictor} d={r.lookahead} k={r.candidates}"
        rows.setdefault((r.policy, label), {})[r.capacity] = r
    for (policy, label), cells in rows.items():
        lines.append(f"| {policy} | {label} | " + " | ".join(
            (f"{'**' if r.meets else ''}{r.effective_hit_rate:.3f}{'**' if r.meets else ''} "
             f"({r.loads_per_token:.1f})" if (r := cells.get(c)) else "") for c, _ in caps) + " |")
    return "\n".join(lines) + "\n"


def best_table(runs: list[Run]) -> str:
    """The best run per (split, capacity), overall and with the model's top-k candidates."""
    lines = ["| train → test | capacity | Belady | best (any k) | eff. hit | loads/token | best (k = top-k) | eff. hit "
             "| loads/token |", "|---" * 9 + "|"]
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.split, r.capacity_label), []).append(r)
    for (split, cap), rs in groups.items():
        best = max(rs, key=lambda r: r.effective_hit_rate)
        narrow = max([r for r in rs if r.candidates <= r.top_k], key=lambda r: r.effective_hit_rate)

        def name(r: Run) -> str:
            return f"{r.policy} + {r.predictor}" + (f" d={r.lookahead} k={r.candidates}" if r.candidates else "")

        lines.append(f"| {split} | {cap} | {rs[0].belady:.3f} | {name(best)} | {best.effective_hit_rate:.3f} "
                     f"| {best.loads_per_token:.1f} | {name(narrow)} | {narrow.effective_hit_rate:.3f} "
                     f"| {narrow.loads_per_token:.1f} |")
    return "\n".join(lines) + "\n"


def markdown(base: list[Baseline], runs: list[Run], grid: Grid) -> str:
    replay = "pinned layer steps" if grid.pin_steps else "access by access"
    text = (f"## Best per split (global cache, prefetch latency {grid.latency} layer steps, lookahead "
            f"{grid.lookahead}, {replay})\n\n" + best_table(runs))
    for split in dict.fromkeys(b.split for b in base):
        text += (f"\n## {split}: effective hit rate 1 - (misses + stalls) / accesses (loads per token); "
                 f"bold: at or above Belady\n\n"
                 + split_table([b for b in base if b.split == split], [r for r in runs if r.split == split]))
    return text


def parse_candidates(spec: str) -> list[str]:
    """``"1x,2x"`` (multiples of each model's top-k) or counts (``"2,4"``), in the order given."""
    out = []
    for part in _names(spec):
        number = part.removesuffix("x")
        if not number.isdigit() or int(number) < 1:
            raise ConfigError(f"bad --candidates {spec!r}", "write multiples of top-k (1x,2x) or counts (2,4)")
        out.append(part)
    if not out:
        raise ConfigError("no --candidates", "write multiples of top-k (1x,2x) or counts (2,4)")
    return out


def candidates_for(spec: str, top_k: int) -> int:
    return int(spec[:-1]) * top_k if spec.endswith("x") else int(spec)


def _names(spec: str) -> list[str]:
    return [n.strip() for n in spec.split(",") if n.strip()]


@app.command()
def sweep_prefetch(
    out: Annotated[Path, typer.Option(help="Folder for prefetch.json and prefetch.md.")],
    train: Annotated[list[str] | None, typer.Option(help="Train trace (PATH or PATH@SEQS); one per split.")] = None,
    test: Annotated[list[str] | None, typer.Option(help="Test trace (PATH or PATH@SEQS); pairs with --train.")]
    = None,
    workload: Annotated[list[str] | None, typer.Option(
        help="A workload's trace (PATH or PATH@SEQS); every ordered pair of two of one model is a split.")] = None,
    policies: Annotated[str, typer.Option(help="Eviction policies (comma-separated).")]
    = "lru,fifo,layer-lru,predictive,layer-budget",
    predictors: Annotated[str, typer.Option(help="Predictors (comma-separated; none: demand only).")]
    = "none,markov,learned",
    capacity: Annotated[str, typer.Option(help="Global cache sizes: shares of layers x experts, or counts.")]
    = "25%,50%",
    latency: Annotated[int, typer.Option(help="Layer steps a prefetch takes to land.")] = 2,
    lookahead: Annotated[int, typer.Option(help="Layers ahead the predictor proposes for.")] = 2,
    candidates: Annotated[str, typer.Option(help="Experts proposed per predicted layer: multiples of top-k (1x) "
                                                 "or counts, a list.")] = "1x,2x",
    pin_steps: Annotated[bool, typer.Option(help="Replay in the runtime's pinned layer steps.")] = True,
    across_tokens: Annotated[bool, typer.Option(help="Past the last layer, propose the next token's first layers "
                                                     "(as the runtime's prefetcher does).")] = True,
    seed: Annotated[int, typer.Option(help="Seed for training the learned predictor.")] = 0,
) -> None:
    """Effective hit rate of every policy x predictor x capacity with prefetching, beside Belady."""
    splits = make_splits(train or [], test or [], workload or [])
    if latency < 0 or lookahead < 1:
        raise ConfigError("--latency must be >= 0 and --lookahead >= 1")
    grid = Grid([check_policy(p) for p in _names(policies)], _names(predictors), capacity, lookahead,
                parse_candidates(candidates), latency, pin_steps, across_tokens)
    t0 = time.perf_counter()
    base, runs, fitted = [], [], []
    train_config = TrainConfig(lookahead=lookahead, seed=seed)
    for split in splits:
        build = factories(split, [n for n in grid.predictors if n != "none"], train_config, None, fitted)
        with progress_bar() as progress:
            task = progress.add_task(f"simulating {split.name}", total=grid.runs_per_split())
            b, r = sweep_split(split, grid, build, lambda task=task, progress=progress: progress.advance(task))
        base += b
        runs += r
    params: dict[str, Any] = {**dataclasses.asdict(grid), "splits": [[s.train.path, s.test.path] for s in splits],
                              "scope": "global", "seed": seed, "online": True,
                              "seconds": round(time.perf_counter() - t0, 2)}
    write_json(out / "prefetch.json", {"schema": SCHEMA, "params": params, "machine": machine_info(),
                                        "fitted": fitted, "belady": [dataclasses.asdict(b) for b in base],
                                        "runs": [dataclasses.asdict(r) for r in runs]})
    text = markdown(base, runs, grid)
    write_text(out / "prefetch.md", text)
    err.print(f"wrote {out}/prefetch.json and prefetch.md ({len(runs)} runs)")
    print(text, end="")


if __name__ == "__main__":
    main(app)
