"""Evaluate expert predictors on routing traces: precision/recall per lookahead, and prefetching in the simulator.

    python scripts/eval_predictors.py \\
        --workload tests/data/mixtral-8x7b-humaneval.jsonl.gz@0 \\
        --workload tests/data/mixtral-8x7b-humaneval.jsonl.gz@1 \\
        --workload scripts/results/traces/tiny-moe-stdlib-heldout.jsonl.gz \\
        --workload scripts/results/traces/tiny-moe-stdlib-prose.jsonl.gz \\
        --predictors prev-token,markov,learned --lookahead 1,2 --policies lru,layer-lru --capacity 25%,50% \\
        --latency 2 --out scripts/results/predictors

``--train``/``--test`` pair up in order (one split each), and every ordered pair of two ``--workload``
traces of the same model is a split too; ``PATH@SEQS`` keeps only those sequences (``@0-19``),
which is how the two-sequence HumanEval trace is split by sequence. Per split, ``markov``
is fit on the train trace, ``learned`` is trained on it (or loaded from ``--learned-weights``), and
every predictor then runs over the test trace token by token, observing each finished token (online
learning) -- see predictors/evaluate.py for the exact precision/recall definitions.

The simulator part runs ``simulate_prefetch`` on the test trace with one global cache over all
layers' experts (--capacity in shares of layers x experts) for every policy, without prediction and
with each predictor proposing its top-k experts for the next ``d`` layers after each layer step. A
prefetch needs --latency layer steps to arrive (each value of the list is a run); a demand access
that finds its prefetch still in flight is a stall -- so with latency 2, lookahead 1 can only
stall. ``stall-causing accesses per token`` = (demand misses + stalls) / tokens, and ``vs LRU``
divides it by LRU's misses per token without prediction at the same capacity. Predict-call costs
are timed separately (best of 5 runs of 300 calls), for one token and for 16-token contexts.

Writes OUT/eval.json (``"accuracy"`` and ``"simulation"`` record lists; ``"fitted"``: markov's
options and the learned predictors' training reports per split; every parameter; the machine) and
OUT/eval.md (the accuracy table, a ``vs LRU`` summary per latency and every simulator run, in
Markdown, also printed on stdout).

Regenerating the tiny-moe traces (scripts/results/traces/; greedy decoding, so deterministic)::

    python scripts/make_trace_prompts.py --out scripts/results/traces
    cd scripts/results/traces
    offload trace tiny-moe --prompts stdlib-heldout.prompts.jsonl --out tiny-moe-stdlib-heldout.jsonl.gz \\
        --max-new-tokens 64 --device cpu --workload stdlib-heldout
    offload trace tiny-moe --prompts stdlib-prose.prompts.jsonl --out tiny-moe-stdlib-prose.jsonl.gz \\
        --max-new-tokens 64 --device cpu --workload stdlib-prose

(a) stdlib-heldout: 40 ~200-character snippets of the standard-library modules tiny-moe's training
held out (md5('0:' + module) % 100 < 5); (b) stdlib-prose: 40 paragraphs of the stdlib's .txt/.rst
documents (English prose; the model trained on .py files only).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from common import err, machine_info, main, make_app, progress_bar, write_json, write_text
from train_predictor import train_with_progress  # a sibling script: scripts/ is on sys.path, as common is

from offload.errors import ConfigError
from offload.sim.simulate import check_policy, simulate_prefetch
from offload.sim.sweep import parse_capacities
from offload.traces.format import Trace
from predictors import Predictor, make_predictor
from predictors.evaluate import PrefetchAdapter, read_trace_spec, score_trace, shape_of, time_predict
from predictors.learned import Learned, TrainConfig, report_dict

SCHEMA = "offload-predictor-eval/1"
BATCH_TOKENS = 16  # tokens per context in the batched timing
MARKOV_OPTIONS = ("horizon", "context", "alpha", "path_weight", "prev_weight")  # recorded in eval.json
app = make_app(__doc__.splitlines()[0])


@dataclass(frozen=True)
class AccuracyRecord:
    """Precision/recall of one predictor at one (lookahead, k) on one split's test trace."""

    split: str
    predictor: str
    lookahead: int
    k: int
    predictions: int
    hits: int
    precision: float
    recall: float
    predict_us: float  # per predict call of one token, all lookaheads up to the largest asked (best of 5 x 300)
    predict_us_batch: float  # the same for contexts of BATCH_TOKENS tokens (batched decode or prefill)
    observe_us: float  # mean per observe call (one finished token) during the scoring pass


@dataclass(frozen=True)
class SimRecord:
    """One simulate_prefetch run: a policy and capacity with or without ("none") a predictor."""

    split: str
    policy: str
    capacity: int
    capacity_label: str
    predictor: str
    lookahead: int  # 0 without a predictor
    candidates: int  # experts proposed per predicted layer
    latency: int
    tokens: int
    accesses: int
    misses: int
    stalls: int
    stall_accesses_per_token: float  # (misses + stalls) / tokens
    vs_lru: float  # stall_accesses_per_token / LRU's misses per token without prediction, same capacity
    issued: int
    used: int
    wasted: int


@dataclass(frozen=True)
class Split:
    name: str
    train: Trace
    test: Trace


def _short(spec: str) -> str:
    name = Path(spec).name
    for suffix in (".jsonl.gz", ".jsonl"):
        name = name.replace(suffix, "")
    return name


def factories(split: Split, names: list[str], train_config: TrainConfig, learned_weights: Path | None,
              reports: list[dict[str, Any]]) -> dict[str, Callable[[], Predictor]]:
    """A fresh-predictor factory per name, fit or trained on the split's train trace."""
    shape = shape_of(split.train)
    if shape != shape_of(split.test):
        raise ConfigError(f"split {split.name}: train shape {shape} differs from test shape {shape_of(split.test)}")
    out: dict[str, Callable[[], Predictor]] = {}
    for name in names:
        if name == "markov":
            fitted = make_predictor("markov", shape).fit(split.train)  # type: ignore[attr-defined]
            reports.append({"split": split.name, "markov": {k: getattr(fitted, k) for k in MARKOV_OPTIONS},
                            "train_tokens": fitted.tokens})
            out[name] = lambda fitted=fitted: copy.deepcopy(fitted)  # online updates must not leak between runs
        elif name == "learned":
            if learned_weights is not None:
                net = make_predictor("learned", shape, weights=learned_weights).net  # type: ignore[attr-defined]
                reports.append({"split": split.name, "weights": str(learned_weights)})
            else:
                net, report = train_with_progress([split.train], train_config, f"training learned ({split.name})")
                reports.append({"split": split.name, **report_dict(report, train_config)})
                err.print(f"learned ({split.name}): train loss {report.train_loss:.4f}, val loss "
                          f"{report.val_loss:.4f}, {report.params:,} params, best step {report.best_step}, "
                          f"{report.seconds:.1f} s")
            out[name] = lambda net=net: Learned(shape, net=net)  # fresh: its markov counts learn online
        else:
            make_predictor(name, shape)  # unknown names fail here, before any work
            out[name] = lambda name=name: make_predictor(name, shape)
    return out


def accuracy(split: Split, build: dict[str, Callable[[], Predictor]], lookaheads: list[int]) -> list[AccuracyRecord]:
    """Score each predictor over the test trace, then time its predict calls on their own."""
    records = []
    d = max(lookaheads)
    for name, make in build.items():
        score = score_trace(make(), split.test, d)
        one, batch = (time_predict(make(), split.test, d, tokens) for tokens in (1, BATCH_TOKENS))
        for c in score.counts:
            if c.lookahead in lookaheads:
                records.append(AccuracyRecord(split.name, name, c.lookahead, c.k, c.predictions, c.hits,
                                              c.precision, c.recall, one, batch, score.observe_us))
    return records


def simulation(split: Split, build: dict[str, Callable[[], Predictor]], lookaheads: list[int], policies: list[str],
               capacities: str, candidates: int | None, latencies: list[int],
               advance: Callable[[], None]) -> list[SimRecord]:
    """Every (capacity, policy): no prediction (latency 0), then each predictor at each lookahead and latency."""
    shape = shape_of(split.test)
    keys = shape.num_layers * shape.num_experts
    records = []
    for spec in parse_capacities(capacities):
        capacity = spec.resolve(keys)
        lru = simulate_prefetch(split.test, "lru", "global", capacity).sim.misses_per_token
        runs: list[tuple[str, int, int, Callable[[], Predictor] | None]] = [("none", 0, 0, None)]
        runs += [(name, d, lat, make) for lat in latencies for name, make in build.items() for d in lookaheads]
        for policy in policies:
            for name, d, lat, make in runs:
                adapter = None if make is None else PrefetchAdapter(make(), d, candidates, seq=split.test.seq)
                r = simulate_prefetch(split.test, policy, "global", capacity, predictor=adapter, latency=lat)
                per_token = (r.sim.misses + r.stalls) / r.sim.num_tokens
                records.append(SimRecord(split.name, policy, capacity, spec.label(keys), name, d,
                                         adapter.k if adapter else 0, lat, r.sim.num_tokens, r.sim.accesses,
                                         r.sim.misses, r.stalls, per_token, per_token / lru if lru else 0.0,
                                         r.issued, r.used, r.wasted))
                advance()
    return records


# ------------------------------------------------------------------------------------ tables


def accuracy_table(records: list[AccuracyRecord]) -> str:
    """One row per (split, predictor, lookahead): P=R at k = top_k, P and R at the larger k, µs per call."""
    rows: dict[tuple[str, str, int], list[AccuracyRecord]] = {}
    for r in records:
        rows.setdefault((r.split, r.predictor, r.lookahead), []).append(r)
    head = f"| train → test | predictor | d | P=R@k | P@2k | R@2k | µs/predict | µs/predict ({BATCH_TOKENS} tokens) |"
    lines = [head, "|---" * 8 + "|"]
    for (split, name, d), rs in rows.items():
        small, big = min(rs, key=lambda r: r.k), max(rs, key=lambda r: r.k)
        lines.append(f"| {split} | {name} | {d} | {small.precision:.3f} | {big.precision:.3f} | {big.recall:.3f} "
                     f"| {small.predict_us:.0f} | {small.predict_us_batch:.0f} |")
    return "\n".join(lines) + "\n"


def simulation_table(records: list[SimRecord]) -> str:
    """Every run; ``latency`` and ``d`` are "-" without a predictor."""
    lines = [("| train → test | policy | capacity | predictor | latency | d | misses | stalls | stall-acc/token "
              "| vs LRU | issued | used | wasted |"), "|---" * 13 + "|"]
    for r in records:
        d, lat = (str(r.lookahead), str(r.latency)) if r.lookahead else ("-", "-")
        lines.append(f"| {r.split} | {r.policy} | {r.capacity_label} | {r.predictor} | {lat} | {d} | {r.misses} "
                     f"| {r.stalls} | {r.stall_accesses_per_token:.3f} | {r.vs_lru:.3f} | {r.issued} | {r.used} "
                     f"| {r.wasted} |")
    return "\n".join(lines) + "\n"


def summary_table(records: list[SimRecord], latency: int) -> str:
    """``vs LRU`` only, one row per (split, capacity, policy), a column per predictor and lookahead."""
    runs = [r for r in records if r.latency in (0, latency)]
    columns = list(dict.fromkeys((r.predictor, r.lookahead) for r in runs))
    grid: dict[tuple[str, str, str], dict[tuple[str, int], float]] = {}
    for r in runs:
        grid.setdefault((r.split, r.capacity_label, r.policy), {})[(r.predictor, r.lookahead)] = r.vs_lru
    head = " | ".join(name if not d else f"{name} d={d}" for name, d in columns)
    lines = [f"| train → test | capacity | policy | {head} |", "|---" * (3 + len(columns)) + "|"]
    for (split, cap, policy), cells in grid.items():
        lines.append(f"| {split} | {cap} | {policy} | "
                     + " | ".join(f"{cells[c]:.3f}" if c in cells else "" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _ints(spec: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"bad {what} {spec!r}", "write whole numbers separated by commas: 1,2") from None
    if not values or min(values) < 1:
        raise ConfigError(f"bad {what} {spec!r}", "give at least one value >= 1")
    return sorted(set(values))


def markdown(acc: list[AccuracyRecord], sim: list[SimRecord], latencies: list[int]) -> str:
    """eval.md: the accuracy table, a ``vs LRU`` summary per latency, then every simulator run."""
    tables = "## Prediction accuracy (k = top_k, 2k = 2 * top_k)\n\n" + accuracy_table(acc)
    for lat in latencies:
        tables += (f"\n## Stall-causing accesses per token vs LRU without prediction (global cache, prefetch "
                   f"latency {lat} layer step{'s' if lat > 1 else ''})\n\n" + summary_table(sim, lat))
    return tables + "\n## Every simulator run\n\n" + simulation_table(sim)


def evaluate_splits(splits: list[Split], names: list[str], lookaheads: list[int], policies: list[str],
                    capacity: str, candidates: int | None, latencies: list[int], train_config: TrainConfig,
                    learned_weights: Path | None) -> tuple[list[AccuracyRecord], list[SimRecord], list[dict]]:
    """Accuracy and simulator records of every split, with a progress bar; also the fitted predictors' reports."""
    reports: list[dict[str, Any]] = []
    acc: list[AccuracyRecord] = []
    sim: list[SimRecord] = []
    runs = len(parse_capacities(capacity)) * len(policies) * (1 + len(names) * len(lookaheads) * len(latencies))
    for split in splits:
        build = factories(split, names, train_config, learned_weights, reports)
        with progress_bar() as progress:
            progress.add_task(f"scoring {split.name}", total=None)
            acc += accuracy(split, build, lookaheads)
            task = progress.add_task(f"simulating {split.name}", total=runs)
            sim += simulation(split, build, lookaheads, policies, capacity, candidates, latencies,
                              lambda task=task, progress=progress: progress.advance(task))
    return acc, sim, reports


def make_splits(train: list[str], test: list[str], workloads: list[str]) -> list[Split]:
    """--train/--test in order, then every ordered pair of distinct --workload traces of the same model and shape."""
    if len(train) != len(test):
        raise ConfigError(f"{len(train)} --train but {len(test)} --test traces", "give one --test per --train")
    traces: dict[str, Trace] = {}
    for spec in [*train, *test, *workloads]:
        if spec not in traces:
            traces[spec] = read_trace_spec(spec)

    def model(spec: str) -> tuple:
        return (traces[spec].header.model, shape_of(traces[spec]))

    pairs = list(zip(train, test)) + [(a, b) for a in workloads for b in workloads if a != b and model(a) == model(b)]
    if not pairs:
        raise ConfigError("no split to evaluate", "give --train A --test B, or two --workload traces of one model")
    return [Split(f"{_short(a)} → {_short(b)}", traces[a], traces[b]) for a, b in pairs]


@app.command()
def evaluate(
    out: Annotated[Path, typer.Option(help="Folder for eval.json and eval.md.")],
    train: Annotated[list[str] | None, typer.Option(help="Train trace (PATH or PATH@SEQS); one per split.")] = None,
    test: Annotated[list[str] | None, typer.Option(help="Test trace (PATH or PATH@SEQS); pairs with --train.")]
    = None,
    workload: Annotated[list[str] | None, typer.Option(
        help="A workload's trace (PATH or PATH@SEQS); every ordered pair of two of them is a split.")] = None,
    predictors: Annotated[str, typer.Option(help="Comma-separated predictor names.")] = "prev-token,markov,learned",
    lookahead: Annotated[str, typer.Option(help="Comma-separated lookaheads (layers ahead).")] = "1,2",
    policies: Annotated[str, typer.Option(help="Simulator eviction policies (comma-separated).")] = "lru,lfu",
    capacity: Annotated[str, typer.Option(help="Global cache sizes: shares of layers x experts, or counts.")]
    = "25%,50%",
    candidates: Annotated[int | None, typer.Option(help="Experts prefetched per predicted layer (default top_k).")]
    = None,
    latency: Annotated[str, typer.Option(help="Layer steps a prefetch takes to arrive (comma-separated).")] = "1,2",
    learned_weights: Annotated[Path | None, typer.Option(help="Use these learned weights instead of training.")]
    = None,
    seed: Annotated[int, typer.Option(help="Seed for training the learned predictor.")] = 0,
) -> None:
    """Precision/recall of each predictor per lookahead, and its effect on a simulated expert cache."""
    splits = make_splits(train or [], test or [], workload or [])
    names = [n.strip() for n in predictors.split(",") if n.strip()]
    lookaheads = _ints(lookahead, "--lookahead")
    policy_list = [p.strip() for p in policies.split(",") if p.strip()]
    for p in policy_list:
        check_policy(p)
    latencies = _ints(latency, "--latency")
    train_config = TrainConfig(lookahead=max(lookaheads), seed=seed)
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]  # the µs timings are only as quiet as the machine: keep its load with them
    acc, sim, reports = evaluate_splits(splits, names, lookaheads, policy_list, capacity, candidates, latencies,
                                        train_config, learned_weights)
    params = {"train": [s.train.path for s in splits], "test": [s.test.path for s in splits], "predictors": names,
              "lookahead": lookaheads,
              "policies": policy_list, "capacity": capacity, "scope": "global", "candidates": candidates,
              "latency": latencies, "learned_weights": str(learned_weights) if learned_weights else None,
              "seed": seed, "online": True, "seconds": round(time.perf_counter() - t0, 2)}
    tables = markdown(acc, sim, latencies)
    machine = {**machine_info(), "torch": torch.__version__,
               "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]}}
    result = {"schema": SCHEMA, "params": params, "machine": machine,
              "fitted": reports, "accuracy": [dataclasses.asdict(r) for r in acc],
              "simulation": [dataclasses.asdict(r) for r in sim]}
    write_json(out / "eval.json", result)
    write_text(out / "eval.md", tables)
    err.print(f"wrote {out}/eval.json and eval.md ({len(acc)} accuracy, {len(sim)} simulation records)")
    print(tables, end="")


if __name__ == "__main__":
    main(app)
