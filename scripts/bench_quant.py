"""Quantized matmuls of every expert format on this CPU, what a miss converts, and quantization error.

Times one token (x [1, in]) through an expert-sized matrix, [3584, 1024] (gate / up) and [1024, 3584] (down), hot
in cache (scripts/bench_kernels.py streams from RAM and sweeps token counts): bf16 and float32 F.linear, offload's
integer kernels (int8 activations), the portable dequantizing path and the vendor formats' dequantize + matmul; and
per matrix what a GPTQ miss still converts (gptq_plain: its int32 words to plain nibbles).
Each thread count runs in its own processes (this script re-invoked with --worker), alternating; inside a
process the methods take turns round by round, so a busy neighbour slows them alike. Reported: the median of
the per-round medians, with the range. Then the relative Frobenius error of RTN and of the clip search on
gaussian weights and on the bundled tiny-moe's trained experts.

    python scripts/bench_quant.py --out scripts/results/bench_quant.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
import typer
from common import machine_info, main, make_app, write_json

from offload.experts import quant as Q
from offload.experts.formats import gptq as G
from offload.experts.formats.fp8 import fp8_block_dequantize
from offload.experts.formats.mxfp4 import mxfp4_dequantize
from offload.experts.kernels.linear import int_linear
from offload.experts.kernels.pool import use_threads

SHAPES = [(3584, 1024), (1024, 3584)]
SCHEMES = ["int8", "int4-g32", "int4-g32-asym", "int4-g64", "int4-g64-asym", "int4-g128", "int4-g128-asym"]


def _median_us(fn, calls: int) -> float:
    samples = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e6


def _methods(out: int, in_: int) -> dict[str, tuple]:
    """name -> (callable, calls multiplier): every method for one shape, weights prepared once."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out, in_, generator=g) * 0.02
    x = torch.randn(1, in_, generator=g)
    xb = x.bfloat16()
    wb = w.bfloat16()
    q8 = Q.quantize(w, Q.parse_scheme("int8"))
    k8 = int_linear(q8)
    q4 = Q.quantize(w, Q.parse_scheme("int4-g128"))
    k4 = int_linear(q4)
    k32 = int_linear(Q.quantize(w, Q.parse_scheme("int4-g32")))
    qweight = G.gptq_pack(q4)["qweight"]
    # vendor formats: the timing does not depend on the codes, only on the shapes
    blocks = torch.randint(0, 256, (out, in_ // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 127, (out, in_ // 32), dtype=torch.uint8, generator=g)
    w_fp8 = w.to(torch.float8_e4m3fn)
    s_fp8 = torch.ones((out + 127) // 128, (in_ + 127) // 128)
    return {
        "bf16 F.linear": (lambda: F.linear(xb, wb), 1),
        "fp32 F.linear": (lambda: F.linear(x, w), 1),
        "offload int8 (int8 x)": (lambda: k8(xb), 1),
        "offload int4 g128 (int8 x)": (lambda: k4(xb), 1),
        "offload int4 g32 (int8 x)": (lambda: k32(xb), 1),
        "dequantize int4 g128 + F.linear (bf16 x)": (lambda: F.linear(xb, Q.dequantize(q4, xb.dtype)), 0.1),
        "mxfp4 dequant + F.linear (bf16 x)": (lambda: F.linear(xb, mxfp4_dequantize(blocks, scales, xb.dtype)), 0.1),
        "fp8 128x128 dequant + F.linear (bf16 x)": (
            lambda: F.linear(xb, fp8_block_dequantize(w_fp8, s_fp8, (128, 128)).to(xb.dtype)), 0.1),
        "convert: gptq_plain (a GPTQ miss)": (lambda: G.gptq_plain(qweight, 4), 0.2),
    }


def worker_run(threads: int, rounds: int, calls: int) -> dict:
    use_threads(threads)
    results: dict[str, dict[str, list[float]]] = {}
    for out, in_ in SHAPES:
        methods = _methods(out, in_)
        for fn, _ in methods.values():  # warm-up: numba compile, allocator, kernels' first calls
            fn()
        per = results.setdefault(f"{out}x{in_}", {name: [] for name in methods})
        for _ in range(rounds):
            for name, (fn, mult) in methods.items():
                per[name].append(_median_us(fn, max(5, int(calls * mult))))
    return {"threads": threads, "loadavg": os.getloadavg(), "rounds_us": results}


def run_workers(threads: list[int], processes: int, rounds: int, calls: int) -> list[dict]:
    runs = []
    for _ in range(processes):
        for t in threads:  # alternate thread counts so drift in the machine's load hits both
            cmd = [sys.executable, __file__, "--worker", str(t), "--rounds", str(rounds), "--calls", str(calls)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                  env=dict(os.environ, OMP_NUM_THREADS=str(t)))
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  worker threads={t} done, load {runs[-1]['loadavg'][0]:.2f}", file=sys.stderr)
    return runs


def summarize(runs: list[dict]) -> dict:
    """threads -> shape -> method -> {median, min, max} over every round of every process."""
    summary: dict = {}
    for run in runs:
        for shape, methods in run["rounds_us"].items():
            for name, samples in methods.items():
                summary.setdefault(str(run["threads"]), {}).setdefault(shape, {}).setdefault(name, []).extend(samples)
    for shapes in summary.values():
        for methods in shapes.values():
            for name, samples in methods.items():
                methods[name] = {"median_us": round(statistics.median(samples), 1), "min_us": round(min(samples), 1),
                                 "max_us": round(max(samples), 1)}
    return summary


def _tiny_moe_experts() -> torch.Tensor | None:
    path = Path(Q.__file__).parents[1] / "bundled" / "tiny-moe" / "model.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    mats = [t.float() for name, t in load_file(path).items() if ".experts." in name and name.endswith("w1.weight")]
    return torch.cat(mats) if mats else None  # [experts * 256, 128]: gate matrices, in = 128


def errors() -> dict:
    """Relative Frobenius error of RTN and of the clip search, per scheme, on gaussian and trained weights."""
    torch.set_num_threads(1)
    weights = {"gaussian 3584x1024": torch.randn(3584, 1024, generator=torch.Generator().manual_seed(0))}
    tiny = _tiny_moe_experts()
    if tiny is not None:
        weights[f"tiny-moe w1 experts {list(tiny.shape)}"] = tiny
    table: dict = {}
    for label, w in weights.items():
        for text in SCHEMES:
            scheme = Q.parse_scheme(text)
            if scheme.group_size and w.shape[1] % scheme.group_size:
                continue
            rtn = Q.reconstruction_error(w, Q.quantize(w, scheme))
            searched = Q.reconstruction_error(w, Q.quantize(w, scheme, clip_search=True))
            table.setdefault(label, {})[str(scheme)] = {"rtn": round(rtn, 5), "clip_search": round(searched, 5),
                                                        "search_vs_rtn": round(searched / rtn, 4)}
    return table


def print_table(summary: dict, err: dict) -> None:
    for threads, shapes in summary.items():
        for shape, methods in shapes.items():
            print(f"\n{shape}, one token, {threads} thread(s): median us [min-max]")
            for name, s in methods.items():
                print(f"  {name:52s} {s['median_us']:9.1f}  [{s['min_us']:.0f}-{s['max_us']:.0f}]")
    for label, rows in err.items():
        print(f"\nrelative Frobenius error, {label}: RTN -> clip search")
        for scheme, e in rows.items():
            print(f"  {scheme:16s} {e['rtn']:.5f} -> {e['clip_search']:.5f} ({e['search_vs_rtn']:.3f}x)")


app = make_app(__doc__.splitlines()[0], no_args_is_help=False)


@app.command()
def bench(
    threads: Annotated[str, typer.Option(help="torch thread counts, each in its own processes.")] = "1,2",
    processes: Annotated[int, typer.Option(help="Processes per thread count (alternating).")] = 2,
    rounds: Annotated[int, typer.Option(help="Rounds per process; methods take turns in each.")] = 5,
    calls: Annotated[int, typer.Option(help="Matmul calls per method per round (converters: 1/5).")] = 100,
    worker: Annotated[int, typer.Option(hidden=True, help="Internal: run one worker at this thread count.")] = 0,
    out: Annotated[Path, typer.Option(help="JSON file to write.")] = Path("scripts/results/bench_quant.json"),
) -> None:
    if worker:
        print(json.dumps(worker_run(worker, rounds, calls)))
        return
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()[:20]
    before = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "loadavg": os.getloadavg()}
    params = {"threads": threads, "processes": processes, "rounds": rounds, "calls": calls, "out": str(out)}
    runs = run_workers([int(t) for t in threads.split(",")], processes, rounds, calls)
    summary = summarize(runs)
    err = errors()
    result = {"machine": machine_info() | {"lscpu": lscpu, "cpu_capability": torch.backends.cpu.get_cpu_capability()},
              "load_before": before, "load_after": os.getloadavg(), "params": params,
              "shapes": SHAPES, "summary": summary, "errors": err, "runs": runs}
    write_json(out, result)
    print_table(summary, err)
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main(app)
