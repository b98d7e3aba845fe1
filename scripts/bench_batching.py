"""Expert-aware batching against FIFO continuous batching on the bundled model (issue 7).

For each expert budget and scheduler, a fresh model generates greedily for the same prompts
(held-out stdlib code, see make_trace_prompts.py) with continuous batching, and the run reports
distinct experts per layer per decode step, expert loads per generated token and tokens/s (median
of --repeats runs in alternating order; the counts are deterministic), with expert-aware / fifo
ratios measured in the same run. Every scheduler must produce the same tokens
for every request; the script checks it and records the answer.

    python scripts/bench_batching.py --prompts 64 --batch-size 8 --budgets 25%,50% \
        --out scripts/results/bench_batching.json
"""

from __future__ import annotations

import statistics
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
from common import err, machine_info, main, make_app, write_json
from make_trace_prompts import code_snippets  # a sibling script: scripts/ is on sys.path, as common is

import offload
from offload.runtime.load import resolve_device

app = make_app(__doc__.splitlines()[0], no_args_is_help=False)  # bare: the benchmark at its default scale


@dataclass(frozen=True)
class Options:
    """Every option of the run, as given (recorded as the JSON's params)."""

    model: str
    prompts: int
    chars: int
    max_new_tokens: int
    batch_size: int
    pool_size: int
    max_wait: int
    budgets: str
    schedulers: str
    offload_to: str
    device: str
    threads: int
    repeats: int
    out: Path


def run_one(opts: Options, prompts: list[str], budget: str, scheduler: str) -> dict:
    model = offload.from_pretrained(opts.model, device=opts.device, expert_budget=budget, offload_to=opts.offload_to)
    model.generate_many(prompts[:2], max_new_tokens=2, batch_size=2)  # warm-up: kernels, allocator
    model.cache.clear()
    model.stats.reset()
    start = time.perf_counter()
    out = model.generate_many(prompts, max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size,
                              scheduler=scheduler, max_wait=opts.max_wait, pool_size=opts.pool_size)
    wall = time.perf_counter() - start  # the completions are host lists: every device step has finished
    stats, total = model.stats, model.stats.total
    tokens = sum(c.completion_tokens for c in out)
    decode_steps = sum(s.steps for s in stats.layers.values()) // len(stats.layers) - len(prompts)
    return {
        "budget": budget, "scheduler": scheduler, "slots": model.cache.num_slots, "wall_s": round(wall, 3),
        "generated_tokens": tokens, "tokens_per_s": tokens / wall, "decode_steps": decode_steps,
        "tokens_per_decode_step": stats.decode_tokens / max(decode_steps, 1),
        "distinct_per_layer_step": total.distinct_per_step, "loads": total.misses,
        "loads_per_token": total.misses / tokens, "hit_rate": total.hit_rate,
        "tokens": [c.token_ids for c in out],
    }


def run_budget(opts: Options, prompts: list[str], budget: str, schedulers: list[str]) -> list[dict]:
    """One run per scheduler at ``budget``: the first repeat's record with the median tokens/s of all repeats."""
    samples: dict[str, list[dict]] = {s: [] for s in schedulers}
    for rep in range(opts.repeats):  # alternate the order so neither scheduler always runs first
        for scheduler in (schedulers if rep % 2 == 0 else schedulers[::-1]):
            samples[scheduler].append(run_one(opts, prompts, budget, scheduler))
    runs = []
    for scheduler in schedulers:
        run = dict(samples[scheduler][0])
        run["tokens_per_s_samples"] = [r["tokens_per_s"] for r in samples[scheduler]]
        run["tokens_per_s"] = statistics.median(run["tokens_per_s_samples"])
        err.print(f"{budget:>5} {scheduler:13s} {run['distinct_per_layer_step']:.2f} distinct/layer/step, "
                  f"{run['loads_per_token']:.2f} loads/token, {run['tokens_per_s']:.1f} tok/s")
        runs.append(run)
    return runs


def table(runs: list[dict], base_scheduler: str) -> str:
    """Markdown: one row per (budget, scheduler), with ratios to ``base_scheduler`` at the same budget."""
    base = {r["budget"]: r for r in runs if r["scheduler"] == base_scheduler}
    lines = [("| budget | scheduler | distinct experts / layer / step | expert loads / token | tokens/s "
              f"| tokens / step | ratios vs {base_scheduler} (distinct, loads/token, tok/s) |"),
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        b = base[r["budget"]]
        ratio = (f"{r['distinct_per_layer_step'] / b['distinct_per_layer_step']:.2f}x, "
                 f"{r['loads_per_token'] / b['loads_per_token']:.2f}x, {r['tokens_per_s'] / b['tokens_per_s']:.2f}x")
        lines.append(f"| {r['budget']} ({r['slots']} slots) | {r['scheduler']} | {r['distinct_per_layer_step']:.2f} | "
                     f"{r['loads_per_token']:.2f} | {r['tokens_per_s']:.1f} | {r['tokens_per_decode_step']:.2f} "
                     f"| {ratio} |")
    return "\n".join(lines)


@app.command()
def bench(
    model: Annotated[str, typer.Option(help="Checkpoint folder, hub id or bundled model name.")] = "tiny-moe",
    prompts: Annotated[int, typer.Option(help="Held-out stdlib code snippets.")] = 64,
    chars: Annotated[int, typer.Option(help="Characters per prompt.")] = 200,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens per request.")] = 32,
    batch_size: Annotated[int, typer.Option(help="Requests decoded together.")] = 8,
    pool_size: Annotated[int, typer.Option(help="Requests prefilled and ready at once (0: 2 x batch).")] = 0,
    max_wait: Annotated[int, typer.Option(help="expert-aware's bound on the steps a request is skipped.")] = 4,
    budgets: Annotated[str, typer.Option(help="Expert budgets, comma-separated (25%, 16, 6GiB).")] = "25%,50%",
    schedulers: Annotated[str, typer.Option(help="Comma-separated; ratios are to the first.")] = "fifo,expert-aware",
    offload_to: Annotated[str, typer.Option(help="Where experts live when not cached: disk or ram.")] = "disk",
    device: Annotated[str, typer.Option(help="cpu, cuda or auto (cuda when there is one).")] = "cpu",
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    repeats: Annotated[int, typer.Option(help="Runs per (budget, scheduler), alternating order; medians.")] = 3,
    out: Annotated[Path, typer.Option(help="JSON file to write.")] = Path("scripts/results/bench_batching.json"),
) -> None:
    """Distinct experts per layer per step, loads per token and tokens/s of each scheduler at each budget."""
    opts = Options(**locals())  # every parameter above, nothing else yet
    resolved = str(resolve_device(device))  # fails here, in one line, when cuda is asked for and absent
    torch.set_num_threads(threads)
    texts = code_snippets(Path(sysconfig.get_paths()["stdlib"]), prompts, chars)
    names = [s.strip() for s in schedulers.split(",")]
    runs = [run for budget in budgets.split(",") for run in run_budget(opts, texts, budget.strip(), names)]
    base = {r["budget"]: r for r in runs if r["scheduler"] == names[0]}
    same_tokens = all(r["tokens"] == base[r["budget"]]["tokens"] for r in runs)
    markdown = table(runs, names[0])
    print(markdown)
    print(f"\nevery request's tokens identical under every scheduler: {same_tokens}")
    result = {"benchmark": "bench_batching", "command": " ".join(sys.argv),
              "params": {k: str(v) for k, v in asdict(opts).items()}, "device": resolved,
              "machine": {**machine_info(), "torch": torch.__version__}, "prompts": texts,
              "same_tokens_under_every_scheduler": same_tokens,
              "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs], "table": markdown}
    write_json(out, result)
    err.print(f"wrote {out}")


if __name__ == "__main__":
    main(app)
