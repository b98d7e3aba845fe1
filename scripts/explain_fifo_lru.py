"""Why fifo beats lru with prefetching on a global cache: the misses by what had evicted the key.

    python scripts/explain_fifo_lru.py --train tests/data/mixtral-8x7b-humaneval.jsonl.gz@0 \\
        --test tests/data/mixtral-8x7b-humaneval.jsonl.gz@1 --out scripts/results/fifo-lru

Replays the test trace through one global cache (--capacity) with markov (fit on --train) proposing
the top-k experts of each of the next --lookahead layers after every layer step, prefetches landing
--latency steps later, for each --policies entry, three ways: as the simulator did before it
matched the runtime (a prefetch could evict another key proposed at the same step, access by
access), with the runtime's protection of the step's proposals, and in the runtime's pinned layer
steps. Every demand miss is charged to the eviction that had removed its key: ``cold`` (never
resident), ``demand +d`` or ``prefetch +d``, made at a step d layers before the key's own layer (+0:
its layer had just run and will not run again for a whole token; +1 .. +lookahead: the layers the
prefetcher was loading for; +lookahead+1 ...: the layers right after those).

Writes OUT/explain.json (every count, every parameter, the machine) and OUT/explain.md (printed).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from common import err, machine_info, main, make_app, write_json, write_text

from offload.sim.simulate import check_policy, simulate_prefetch
from offload.sim.sweep import parse_capacities
from predictors import make_predictor
from predictors.evaluate import PrefetchAdapter, read_trace_spec, shape_of

app = make_app(__doc__.splitlines()[0])
MODES = {"before (proposals unprotected)": (False, False), "runtime's protection": (True, False),
         "runtime's pinned steps": (True, True)}  # name -> (protect_proposals, pin_steps)


def buckets(causes: dict[str, int], lookahead: int, num_layers: int) -> dict[str, int]:
    """Miss causes folded into: cold, demand +0, demand other, prefetch +0, prefetch +1..+d (the layers being
    prefetched for), prefetch +d+1..+d+2 (the next ones), prefetch other (layers already passed)."""
    out = dict.fromkeys(["cold", "demand +0", "demand other", "prefetch +0", f"prefetch +1..+{lookahead}",
                         f"prefetch +{lookahead + 1}..+{lookahead + 2}", "prefetch other"], 0)
    for cause, n in causes.items():
        if cause == "cold":
            out["cold"] += n
            continue
        kind, ahead = cause.split(" +")
        d = int(ahead)
        if kind == "demand":
            out["demand +0" if d == 0 else "demand other"] += n
        elif d == 0:
            out["prefetch +0"] += n
        elif d <= lookahead:
            out[f"prefetch +1..+{lookahead}"] += n
        elif d <= lookahead + 2 and d < num_layers:
            out[f"prefetch +{lookahead + 1}..+{lookahead + 2}"] += n
        else:
            out["prefetch other"] += n
    return out


def table(records: list[dict[str, Any]]) -> str:
    cols = list(records[0]["buckets"])
    lines = ["| policy | replay | misses | stalls | prefetches | " + " | ".join(cols) + " |",
             "|---" * (5 + len(cols)) + "|"]
    for r in records:
        lines.append(f"| {r['policy']} | {r['mode']} | {r['misses']:,} | {r['stalls']:,} | {r['issued']:,} | "
                     + " | ".join(f"{r['buckets'][c]:,}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


@app.command()
def explain(
    train: Annotated[str, typer.Option(help="Trace markov is fit on (PATH or PATH@SEQS).")],
    test: Annotated[str, typer.Option(help="Trace replayed (PATH or PATH@SEQS).")],
    out: Annotated[Path, typer.Option(help="Folder for explain.json and explain.md.")],
    policies: Annotated[str, typer.Option(help="Eviction policies (comma-separated).")] = "lru,fifo,layer-lru",
    capacity: Annotated[str, typer.Option(help="One global cache size: a share of layers x experts, or a count.")]
    = "25%",
    lookahead: Annotated[int, typer.Option(help="Layers ahead markov proposes for.")] = 2,
    latency: Annotated[int, typer.Option(help="Layer steps a prefetch takes to land.")] = 1,
    across_tokens: Annotated[bool, typer.Option(help="Also propose the next token's first layers (off: as when the "
                                                     "gap was found).")] = False,
) -> None:
    """Misses of each policy by the eviction that caused them, before and after the simulator matched the runtime."""
    t0 = time.perf_counter()
    train_trace, test_trace = read_trace_spec(train), read_trace_spec(test)
    shape = shape_of(test_trace)
    cap = parse_capacities(capacity)[0].resolve(shape.num_layers * shape.num_experts)
    fitted = make_predictor("markov", shape_of(train_trace)).fit(train_trace)  # type: ignore[attr-defined]
    records = []
    for policy in [check_policy(p.strip()) for p in policies.split(",") if p.strip()]:
        for mode, (protect, pin) in MODES.items():
            adapter = PrefetchAdapter(copy.deepcopy(fitted), lookahead, seq=test_trace.seq, across_tokens=across_tokens)
            r = simulate_prefetch(test_trace, policy, "global", cap, predictor=adapter, latency=latency,
                                  pin_steps=pin, protect_proposals=protect)
            records.append({"policy": policy, "mode": mode, "misses": r.sim.misses, "stalls": r.stalls,
                            "issued": r.issued, "used": r.used, "wasted": r.wasted,
                            "effective_hit_rate": r.effective_hit_rate, "miss_causes": dict(r.miss_causes),
                            "buckets": buckets(dict(r.miss_causes), lookahead, shape.num_layers)})
    params = {"train": train, "test": test, "capacity": cap, "capacity_spec": capacity, "lookahead": lookahead,
              "latency": latency, "across_tokens": across_tokens, "predictor": "markov",
              "seconds": round(time.perf_counter() - t0, 2)}
    write_json(out / "explain.json", {"schema": "offload-fifo-lru/1", "params": params, "machine": machine_info(),
                                       "records": records})
    text = (f"Global cache of {cap}, markov d={lookahead}, latency {latency}: demand misses by the eviction that "
            f"had removed the key\n\n" + table(records))
    write_text(out / "explain.md", text)
    err.print(f"wrote {out}/explain.json and explain.md")
    print(text, end="")


if __name__ == "__main__":
    main(app)
