"""Expert-aware batching against FIFO continuous batching on the bundled model (issue 7).

For each expert budget and scheduler, a fresh model generates greedily for the same prompts
(held-out stdlib code, see make_trace_prompts.py) with continuous batching, and the run reports
distinct experts per layer per decode step, expert loads per generated token and tokens/s (median
of --repeats runs in alternating order; the counts are deterministic), with expert-aware / fifo
ratios measured in the same run. Every scheduler must produce the same tokens
for every request; the script checks it and records the answer.

    python scripts/bench_batching.py --prompts 64 --batch-size 8 --budgets 25%,50% --out scripts/results/bench_batching.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

import offload
from offload.hardware import machine_info

sys.path.insert(0, str(Path(__file__).parent))
from make_trace_prompts import code_snippets  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-moe")
    p.add_argument("--prompts", type=int, default=64, help="held-out stdlib code snippets")
    p.add_argument("--chars", type=int, default=200, help="characters per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pool-size", type=int, default=0, help="requests prefilled and ready at once (0: 2 x batch)")
    p.add_argument("--max-wait", type=int, default=4)
    p.add_argument("--budgets", default="25%,50%")
    p.add_argument("--schedulers", default="fifo,expert-aware")
    p.add_argument("--offload-to", default="disk")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs per (budget, scheduler), alternating order; medians")
    p.add_argument("--out", type=Path, default=Path("scripts/results/bench_batching.json"))
    return p.parse_args()


def run_one(args: argparse.Namespace, prompts: list[str], budget: str, scheduler: str) -> dict:
    model = offload.from_pretrained(args.model, device="cpu", expert_budget=budget, offload_to=args.offload_to)
    model.generate_many(prompts[:2], max_new_tokens=2, batch_size=2)  # warm-up: kernels, allocator
    model.cache.clear()
    model.stats.reset()
    start = time.perf_counter()
    out = model.generate_many(prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              scheduler=scheduler, max_wait=args.max_wait, pool_size=args.pool_size)
    wall = time.perf_counter() - start
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


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    prompts = code_snippets(Path(sysconfig.get_paths()["stdlib"]), args.prompts, args.chars)
    budgets = [b.strip() for b in args.budgets.split(",")]
    schedulers = [s.strip() for s in args.schedulers.split(",")]
    runs = []
    for budget in budgets:
        samples: dict[str, list[dict]] = {s: [] for s in schedulers}
        for rep in range(args.repeats):  # alternate the order so neither scheduler always runs first
            for scheduler in (schedulers if rep % 2 == 0 else schedulers[::-1]):
                samples[scheduler].append(run_one(args, prompts, budget, scheduler))
        for scheduler in schedulers:
            run = dict(samples[scheduler][0])
            run["tokens_per_s_samples"] = [r["tokens_per_s"] for r in samples[scheduler]]
            run["tokens_per_s"] = statistics.median(run["tokens_per_s_samples"])
            print(f"{budget:>5} {scheduler:13s} {run['distinct_per_layer_step']:.2f} distinct/layer/step, "
                  f"{run['loads_per_token']:.2f} loads/token, {run['tokens_per_s']:.1f} tok/s", file=sys.stderr)
            runs.append(run)
    base = {r["budget"]: r for r in runs if r["scheduler"] == schedulers[0]}
    same_tokens = all(r["tokens"] == base[r["budget"]]["tokens"] for r in runs)
    lines = ["| budget | scheduler | distinct experts / layer / step | expert loads / token | tokens/s "
             "| tokens / step | ratios vs " + schedulers[0] + " (distinct, loads/token, tok/s) |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        b = base[r["budget"]]
        ratio = (f"{r['distinct_per_layer_step'] / b['distinct_per_layer_step']:.2f}x, "
                 f"{r['loads_per_token'] / b['loads_per_token']:.2f}x, {r['tokens_per_s'] / b['tokens_per_s']:.2f}x")
        lines.append(f"| {r['budget']} ({r['slots']} slots) | {r['scheduler']} | {r['distinct_per_layer_step']:.2f} | "
                     f"{r['loads_per_token']:.2f} | {r['tokens_per_s']:.1f} | {r['tokens_per_decode_step']:.2f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    print(f"\nevery request's tokens identical under every scheduler: {same_tokens}")
    result = {"benchmark": "bench_batching", "command": " ".join(sys.argv), "params": {k: str(v) for k, v in vars(args).items()},
              "machine": {**machine_info(), "torch": torch.__version__}, "prompts": prompts,
              "same_tokens_under_every_scheduler": same_tokens,
              "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs], "table": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
