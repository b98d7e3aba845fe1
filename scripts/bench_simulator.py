"""Speed of the numba cache simulator against the pure-Python oracle of tests/reference.py.

Measures accesses per second (best of ``--repeats``, numba compilation or cache loading excluded
and reported apart) on the HumanEval trace and on a synthetic Mixtral-shaped trace of
``--synthetic-accesses`` accesses, for every policy with a per-layer cache (C=4) and a global one
(50% of the keys); the oracle runs on the HumanEval trace only (it needs minutes for 10M accesses).
Then times the whole default sweep of the HumanEval trace (40 simulations). Prints a table and
writes JSON with the machine, the versions and every parameter.

    python scripts/bench_simulator.py --out out/bench_simulator.json
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from common import ROOT, machine_info, main, make_app, write_json

from offload.sim.simulate import SIM_POLICIES, AccessStream, simulate, simulate_prefetch
from offload.sim.sweep import SweepConfig, sweep
from offload.traces.format import read_trace
from tests import reference  # the oracles, shared with the tests (common.py puts the checkout on sys.path)

app = make_app(__doc__.splitlines()[0], no_args_is_help=False)  # bare: the benchmark at its default scale


def synthetic(accesses: int, seed: int, layers: int = 32, experts: int = 8, top_k: int = 2) -> AccessStream:
    """Mixtral-shaped routing: each layer draws top-k without replacement from its own skewed popularity
    (Dirichlet(0.5)), so hit rates land near the real trace's instead of a uniform worst case."""
    rng = np.random.default_rng(seed)
    tokens = accesses // (layers * top_k)
    log_pop = np.log(rng.dirichlet(np.full(experts, 0.5), size=layers)).astype(np.float32)  # [layers, experts]
    chosen = np.empty((tokens, layers, top_k), dtype=np.int16)
    for start in range(0, tokens, 65536):  # Gumbel top-k in chunks: [chunk, layers, experts] floats at a time
        stop = min(start + 65536, tokens)
        noisy = log_pop + rng.gumbel(size=(stop - start, layers, experts)).astype(np.float32)
        chosen[start:stop] = np.argsort(-noisy, axis=2)[:, :, :top_k]
    return AccessStream.from_experts(chosen, experts)


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def configs(stream: AccessStream) -> list[tuple[str, str, int]]:
    return [(p, scope, cap) for p in SIM_POLICIES
            for scope, cap in (("per-layer", 4), ("global", stream.num_keys // 2))]


def time_configs(name: str, stream: AccessStream, repeats: int, with_reference: bool) -> list[dict]:
    """One row per (policy, scope): numba accesses/s and, on small traces, the oracle's and the ratio."""
    rows = []
    keys, n = stream.keys.tolist(), stream.keys.size
    for policy, scope, cap in configs(stream):
        fast = best_seconds(lambda p=policy, s=scope, c=cap: simulate(stream, p, s, c), repeats)
        row = {"trace": name, "policy": policy, "scope": scope, "capacity": cap, "accesses": n,
               "hit_rate": simulate(stream, policy, scope, cap).hit_rate, "numba_s": fast,
               "numba_accesses_per_s": n / fast}
        if with_reference:
            part = (lambda k: k // stream.num_experts) if scope == "per-layer" else (lambda k: 0)
            slow = best_seconds(lambda p=policy, c=cap, f=part: reference.ref_simulate(keys, p, c, f), 1)
            row |= {"reference_s": slow, "reference_accesses_per_s": n / slow, "speedup": slow / fast}
        rows.append(row)
        print(f"  {name} {policy} {scope} C={cap}: {n / fast / 1e6:.1f} M accesses/s", file=sys.stderr)
    return rows


def print_table(result: dict, trace: Path, out: Path) -> None:
    print("| trace | policy | scope | C | numba M acc/s | reference M acc/s | speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        ref = f"{r['reference_accesses_per_s'] / 1e6:.3f} | {r['speedup']:,.0f}x" if "speedup" in r else "- | -"
        print(f"| {r['trace']} | {r['policy']} | {r['scope']} | {r['capacity']} | "
              f"{r['numba_accesses_per_s'] / 1e6:.1f} | {ref} |")
    sweep_run, machine, load = result["humaneval_default_sweep"], result["machine"], result["loadavg_1min"]
    print(f"\nwhole default sweep of {trace.name} ({sweep_run['runs']} runs): {sweep_run['wall_s'] * 1e3:.1f} ms; "
          f"warm-up (compile or cache load) {result['warmup_s']:.2f} s; Python twin (lru, per-layer): "
          f"{result['python_twin_lru_per_layer_accesses_per_s'] / 1e6:.2f} M acc/s")
    print(f"machine: {machine['cpu_model']}, {machine['cores']} cores, load average {load['before']:.1f} before "
          f"and {load['after']:.1f} after; wrote {out}")


@app.command()
def bench(
    trace: Annotated[Path, typer.Option(help="Routing trace timed with every policy and by the oracle.")]
    = ROOT / "tests" / "data" / "mixtral-8x7b-humaneval.jsonl.gz",
    synthetic_accesses: Annotated[int, typer.Option(help="Size of the synthetic trace.")] = 10_000_000,
    repeats: Annotated[int, typer.Option(help="Timed runs per configuration; the best counts.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic trace.")] = 0,
    out: Annotated[Path, typer.Option(help="JSON file to write.")] = ROOT / "out" / "bench_simulator.json",
) -> None:
    """Accesses per second of the numba simulator, the pure-Python oracle and a whole default sweep."""
    load_before = os.getloadavg()[0]  # timings are only as quiet as the machine: keep its load with them
    humaneval = AccessStream.from_trace(read_trace(trace))
    t0 = time.perf_counter()
    for policy, scope, cap in configs(humaneval):  # compile, or load numba's on-disk cache
        simulate(humaneval, policy, scope, cap)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    big = synthetic(synthetic_accesses, seed)
    gen_s = time.perf_counter() - t0

    rows = time_configs("humaneval", humaneval, repeats, True)
    rows += time_configs("synthetic", big, repeats, False)
    twin = best_seconds(lambda: simulate_prefetch(humaneval, "lru", "per-layer", 4), 1)
    sweep_s = best_seconds(lambda: list(sweep(trace.name, humaneval, SweepConfig())), max(repeats, 5))
    result = {
        "machine": machine_info(),
        "params": {"trace": str(trace), "synthetic_accesses": int(big.keys.size), "seed": seed,
                   "repeats": repeats,
                   "synthetic_shape": [big.num_tokens, big.num_layers, big.num_experts, big.top_k]},
        "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "warmup_s": warmup_s, "synthetic_generation_s": gen_s, "rows": rows,
        "python_twin_lru_per_layer_accesses_per_s": humaneval.keys.size / twin,
        "humaneval_default_sweep": {"runs": SweepConfig().runs_per_trace(), "wall_s": sweep_s},
    }
    write_json(out, result)
    print_table(result, trace, out)


if __name__ == "__main__":
    main(app)
