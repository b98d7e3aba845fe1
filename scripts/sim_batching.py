"""Simulate continuous batching over routing traces: expert-aware scheduling against fifo.

    python scripts/sim_batching.py --trace tests/data/mixtral-8x7b-humaneval.jsonl.gz --requests 1000 \\
        --batch-size 8,32 --schedulers fifo,expert-aware --max-wait 4 --cache 25%,50% --out out/batching

Every decode sequence of a trace is a request (offload/sim/batching.py cuts and samples them); each run
pushes the same requests through a scheduler and one global expert cache. Writes OUT/batching.json
(``{"schema": "offload-batching-sim/1", "records": [...], "locality": ..., "params": ..., "machine": ...}``,
one record per run; locality: how alike each trace's routes are) and OUT/batching.md (the table
printed on stdout): per trace, batch size, cache and pool, each scheduler's distinct experts per
layer per step, expert loads per token, steps, tokens per step, waits and latencies, with
expert-aware's ratios to fifo on the same requests. Progress and errors go to stderr; a bad trace or
option is one line ``Error: ...`` and exit code 1.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from typing import Annotated, Any

import typer
from common import err, machine_info, main, make_app, progress_bar, write_json, write_text

from offload.errors import ConfigError
from offload.sim.batching import BatchSimConfig, locality, make_workload, simulate_batching
from offload.sim.sweep import CapacitySpec, parse_capacities
from offload.traces.format import read_trace

SCHEMA = "offload-batching-sim/1"
_POOL = re.compile(r"^(\d+)x$")
app = make_app(__doc__.splitlines()[0])


@dataclass(frozen=True)
class Run:
    """One simulated run: where its requests come from and how they were scheduled."""

    trace: str
    workload: str  # "trace" | "relabelled" (the no-cross-request-locality control)
    scheduler: str
    prediction: str
    batch_size: int
    max_wait: int
    pool: int
    cache: str  # as asked: "25% (64)"
    config: BatchSimConfig


def _ints(spec: str, what: str, least: int) -> list[int]:
    try:
        values = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"bad {what} {spec!r}", "give comma-separated whole numbers") from None
    if not values or min(values) < least:
        raise ConfigError(f"bad {what} {spec!r}", f"give comma-separated whole numbers >= {least}")
    return values


def _names(spec: str) -> list[str]:
    return [p.strip() for p in spec.split(",") if p.strip()]


def _pools(spec: str, batch_size: int) -> list[int]:
    """``2x`` (times the batch) or a count; 0 is the runtime's default, 2x."""
    out = []
    for part in _names(spec):
        factor = _POOL.match(part)
        if not (factor or part.isdigit()):
            raise ConfigError(f"bad pool {part!r}", "give multiples of the batch size (2x, 8x) or request counts")
        out.append(int(factor.group(1)) * batch_size if factor else int(part) or 2 * batch_size)
    return out


def plan(trace_name: str, workload: str, num_keys: int, batch_sizes: list[int], caches: tuple[CapacitySpec, ...],
         pools: str, schedulers: list[str], max_waits: list[int], predictions: list[str],
         base: BatchSimConfig) -> list[Run]:
    """Every run for one workload; fifo ignores max_wait and predictions, so it runs once per group."""
    runs = []
    for batch_size, cache in product(batch_sizes, caches):
        for pool in _pools(pools, batch_size):
            for scheduler in schedulers:
                variants = [(0, "prev-token")] if scheduler == "fifo" else list(product(max_waits, predictions))
                for max_wait, prediction in variants:
                    config = BatchSimConfig(**{**asdict(base), "scheduler": scheduler, "batch_size": batch_size,
                                               "max_wait": max_wait, "prediction": prediction,
                                               "capacity": cache.resolve(num_keys), "pool_size": pool})
                    runs.append(Run(trace_name, workload, scheduler, prediction, batch_size, max_wait, config.pool,
                                    cache.label(num_keys), config))
    return runs


def record(run: Run, result: dict[str, Any], seconds: float) -> dict[str, Any]:
    cfg = run.config
    return {"trace": run.trace, "workload": run.workload, "scheduler": run.scheduler, "prediction": run.prediction,
            "batch_size": run.batch_size, "max_wait": run.max_wait if run.scheduler != "fifo" else None,
            "pool": run.pool, "cache": run.cache, "capacity": cfg.capacity, "policy": cfg.policy,
            "resident_weight": cfg.resident_weight if run.scheduler != "fifo" else None,
            "admission": cfg.admission if run.scheduler != "fifo" else "arrival", **result,
            "seconds": round(seconds, 2)}


def describe(stats: dict[str, float]) -> str:
    """One line on how alike the trace's routes are (offload.sim.batching.locality) and how many requests repeat."""
    return (f"experts shared with the previous token {stats['prev_token']:.3f}, with a random token of the same "
            f"sequence {stats['same_seq']:.3f}, of another sequence {stats['other_seq']:.3f}, by chance "
            f"{stats['chance']:.3f}; {stats['duplicates']:.0%} of the requests repeat an earlier one")


def markdown(records: list[dict[str, Any]], notes: dict[str, str] | None = None) -> str:
    """One table per trace and workload; ratios are to fifo's run on the same requests, batch, cache and pool."""
    lines: list[str] = []
    key = ("trace", "workload", "batch_size", "cache", "pool")
    fifo = {tuple(r[k] for k in key): r for r in records if r["scheduler"] == "fifo"}
    for trace, workload in dict.fromkeys((r["trace"], r["workload"]) for r in records):
        rows = [r for r in records if r["trace"] == trace and r["workload"] == workload]
        lines += [f"**{trace}**" + (" (relabelled: no locality across requests)" if workload != "trace" else ""),
                  f"{rows[0]['requests']} requests, {rows[0]['tokens']} tokens"
                  + (f"; {notes[trace]}" if notes and trace in notes and workload == "trace" else ""), "",
                  ("| batch | cache | pool | scheduler | distinct experts/layer/step | ratio | loads/token | ratio "
                   "| steps | tokens/step | max wait | p99 wait | p99 latency |"), "|---" * 13 + "|"]
        for r in rows:
            base = fifo.get(tuple(r[k] for k in key))
            name = r["scheduler"] if r["scheduler"] == "fifo" else (
                f"{r['scheduler']} (wait<={r['max_wait']}" + (", oracle" if r["prediction"] == "oracle" else "") + ")")
            distinct, loads = (_ratio(r, base, f) for f in ("distinct_per_layer", "loads_per_token"))
            lines.append(f"| {r['batch_size']} | {r['cache']} | {r['pool']} | {name} | {r['distinct_per_layer']:.2f} "
                         f"| {distinct} | {r['loads_per_token']:.2f} | {loads} "
                         f"| {r['steps']} | {r['tokens_per_step']:.2f} | {r['wait_max']} | {r['wait_p99']:.0f} "
                         f"| {r['p99_latency']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def _ratio(record: dict[str, Any], base: dict[str, Any] | None, field: str) -> str:
    return f"{record[field] / base[field]:.3f}" if base and base[field] else ""


def run(traces: list[Path], out: Path, requests: int, batch_sizes: list[int], schedulers: list[str],
        max_waits: list[int], predictions: list[str], caches: tuple[CapacitySpec, ...], pools: str, relabel: bool,
        min_tokens: int, base: BatchSimConfig) -> str:
    """Read the traces, simulate every run with a progress bar, write the files; returns the Markdown."""
    if not caches:
        raise ConfigError("no cache size", "give --cache, e.g. 25%,50%")
    work = []
    alike: dict[str, dict[str, float]] = {}
    for path in traces:
        trace = read_trace(path)
        h = trace.header
        for workload in ("trace", "relabelled") if relabel else ("trace",):
            requests_ = make_workload(trace, requests, base.seed, min_tokens, relabel=workload == "relabelled")
            if workload == "trace":
                repeats = 1 - len({w.source for w in requests_}) / len(requests_)
                alike[path.name] = {**locality(trace, seed=base.seed), "duplicates": repeats}
            for r in plan(path.name, workload, h.num_layers * h.num_experts, batch_sizes, caches, pools, schedulers,
                          max_waits, predictions, base):
                work.append((r, requests_, h.num_experts))
    records = []
    with progress_bar() as progress:
        task = progress.add_task("simulating", total=len(work))
        for r, requests_, num_experts in work:
            progress.update(task, description=f"{r.trace} b{r.batch_size} {r.cache} {r.scheduler}")
            t0 = time.perf_counter()
            result = simulate_batching(requests_, r.config, num_experts).to_dict()
            records.append(record(r, result, time.perf_counter() - t0))
            progress.advance(task)
    params = {"traces": [str(p) for p in traces], "requests": requests, "batch_sizes": batch_sizes,
              "schedulers": schedulers, "max_waits": max_waits, "predictions": predictions,
              "caches": [c.text for c in caches], "pools": pools, "relabel": relabel, "min_tokens": min_tokens,
              "policy": base.policy, "resident_weight": base.resident_weight, "admission": base.admission,
              "arrival_rate": base.arrival_rate, "seed": base.seed}
    table = markdown(records, {name: describe(stats) for name, stats in alike.items()})
    write_json(out / "batching.json", {"schema": SCHEMA, "records": records, "locality": alike, "params": params,
                                       "machine": machine_info()})
    write_text(out / "batching.md", table)
    err.print(f"wrote {out}/batching.json, batching.md ({len(records)} runs)")
    return table


@app.command()
def simulate(
    trace: Annotated[list[Path], typer.Option(help="Routing trace (.jsonl.gz or .jsonl); repeat for several.")],
    out: Annotated[Path, typer.Option(help="Folder for batching.json and batching.md.")],
    requests: Annotated[int, typer.Option(help="Requests per trace, sampled from its decode sequences; 0: each "
                                                "sequence once, whole (distinct prompts).")] = 1000,
    batch_size: Annotated[str, typer.Option(help="Requests per decode step; comma-separated for several.")] = "8,32",
    schedulers: Annotated[str, typer.Option(help="Comma-separated: fifo, expert-aware.")] = "fifo,expert-aware",
    max_wait: Annotated[str, typer.Option(help="expert-aware's bound on skipped steps; comma-separated.")] = "4",
    cache: Annotated[str, typer.Option(help="Global cache sizes: shares of all (layer, expert) keys or counts.")]
    = "25%,50%",
    pool: Annotated[str, typer.Option(help="Ready requests at once: multiples of the batch (2x) or counts.")] = "2x",
    prediction: Annotated[str, typer.Option(help="What expert-aware sees: prev-token, oracle (comma-separated).")]
    = "prev-token",
    policy: Annotated[str, typer.Option(help="Eviction policy of the cache: lru, lfu, fifo.")] = "lru",
    resident_weight: Annotated[float, typer.Option(help="expert-aware: cost of a cached key (1 = uncached).")] = 0.5,
    admission: Annotated[str, typer.Option(help="similar (admission_order) or arrival, for non-fifo.")] = "similar",
    arrival_rate: Annotated[float, typer.Option(help="Requests arriving per step (Poisson); 0: all at once.")] = 0.0,
    relabel: Annotated[bool, typer.Option(help="Also run the relabelled control (no locality across requests).")]
    = False,
    min_tokens: Annotated[int, typer.Option(help="Fewest steps of a request cut from a longer sequence.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the request sampling and arrivals.")] = 0,
) -> None:
    """Distinct experts per step and expert loads per token of each request scheduler, on real routing traces."""
    base = BatchSimConfig(policy=policy, resident_weight=resident_weight, admission=admission,
                          arrival_rate=arrival_rate, seed=seed)
    print(run(trace, out, requests, _ints(batch_size, "batch size", 1), _names(schedulers),
              _ints(max_wait, "max wait", 0), _names(prediction), parse_capacities(cache), pool, relabel,
              min_tokens, base), end="")


if __name__ == "__main__":
    main(app)
