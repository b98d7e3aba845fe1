"""GB/s of weight bytes through offload's CPU kernels and torch's, per format, token count and thread count.

Expert-sized matrices, [3584, 1024] and [1024, 3584] taking turns, in enough copies (--ram-mib) that every call
reads its weights from RAM, not from the last-level cache. Formats: bf16, f16, f32 (offload's float GEMV against
F.linear), int8 per channel, int4 g128 / g32, GGUF's Q8_0 / Q4_0 / Q4_K / Q6_K / MXFP4 blocks and gpt-oss's MXFP4
(offload's kernels with int8 activations against torch's ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``
on bf16 activations, weights packed by torch's own converter). Beside them, in the same worker, the memory bandwidth the
same threads reach: a read-only stream (sum of a 256 MiB float32 array) and the triad a = b + 3c, both in numba on
offload's pool.

Each thread count runs in its own processes (this script re-invoked with --worker), alternating; inside a process
the methods take turns round by round, so a busy neighbour slows them alike; a round's time is the median over
its calls, the result the median over rounds and processes with the range. Bytes counted: codes plus scales.

    python scripts/bench_kernels.py --out scripts/results/bench_kernels.json
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

import gguf
import numpy as np
import torch
import torch.nn.functional as F
import typer
from common import machine_info, main, make_app, write_results
from numba import njit

from offload.experts import quant as Q
from offload.experts.kernels.linear import BlockLinear, Mxfp4Linear, float_linear, int_linear
from offload.experts.kernels.pool import pool, use_threads

SHAPES = ((3584, 1024), (1024, 3584))
FORMATS = ("bf16", "f16", "f32", "int8", "int4-g128", "int4-g32", "q8_0", "q4_0", "q4_k", "q6_k", "mxfp4",
           "mxfp4-gpt-oss")
# ggml's blocks (GGUF files) against torch's int8 kernel / int4 g32 kernel on the same weights
_TORCH_TWIN = {"q8_0": "int8", "q4_0": "int4-g32", "q4_k": "int4-g32", "q6_k": "int8", "mxfp4": "int4-g32"}
STREAM_MIB = 256


def _torch_int(fmt: str, w: torch.Tensor):
    """torch's own CPU weight-only kernel for an integer format, on bf16 activations (its fast path)."""
    if fmt == "int8":
        q = Q.quantize(w, Q.parse_scheme("int8"))
        w8 = (q.codes.int() - 128).to(torch.int8)
        scales = q.scales[:, 0].bfloat16()
        return lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, scales), w8.nbytes + scales.nbytes
    group = int(fmt.split("-g")[1])
    q = Q.quantize(w, Q.QuantScheme(4, group, False))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.codes.int(), 1)
    sz = torch.stack((q.scales, q.scales * (8 - q.zeros)), -1).transpose(0, 1).contiguous().bfloat16()
    return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz),
            packed.nbytes + sz.nbytes)


def _ggml_blocks(w: torch.Tensor, kind: str) -> np.ndarray:
    """``w`` in ggml's ``kind`` blocks. gguf's package quantizes Q8_0 / Q4_0 but not the K types, whose speed does
    not depend on their values: those get random codes, scales and mins, with finite f16 super-block scales."""
    qtype = gguf.GGMLQuantizationType[kind]
    if not kind.endswith("_K"):
        return gguf.quants.quantize(w.numpy(), qtype)
    block, size = gguf.constants.GGML_QUANT_SIZES[qtype]
    n, k = w.shape
    raw = np.random.default_rng(n).integers(0, 256, (n, k // block, size), dtype=np.uint8)
    d = np.full((n, k // block, 2), 0.01, np.float16).view(np.uint8)  # [n, blocks, 4]: d's and dmin's bytes
    if kind == "Q4_K":
        raw[..., :4] = d
    else:
        raw[..., size - 2:] = d[..., :2]  # Q6_K's d is its last field
    return raw.reshape(n, -1)


def _pair(fmt: str, w: torch.Tensor):
    """(offload's call, torch's call, bytes each reads) for one float32 weight in ``fmt``."""
    if fmt in ("bf16", "f16", "f32"):
        dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[fmt]
        wd = w.to(dtype).contiguous()
        return (lambda x: float_linear(x, wd)), (lambda x: F.linear(x.to(dtype), wd)), wd.nbytes, wd.nbytes
    if fmt == "mxfp4-gpt-oss":  # the released safetensors' layout: codes and exponents apart, speed not value-bound
        n, k = w.shape
        g = torch.Generator().manual_seed(n)
        lin = Mxfp4Linear(torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8),
                          torch.randint(120, 130, (n, k // 32), generator=g, dtype=torch.uint8))
        theirs, theirs_bytes = _torch_int("int4-g32", w)
        return lin, (lambda x: theirs(x.bfloat16())), lin.codes.nbytes + lin.exponents.nbytes, theirs_bytes
    if fmt in _TORCH_TWIN:
        kind = fmt.upper()
        raw = _ggml_blocks(w, kind)
        lin = BlockLinear(torch.from_numpy(np.ascontiguousarray(raw)).view(torch.uint8), kind, w.shape[1])
        theirs, theirs_bytes = _torch_int(_TORCH_TWIN[fmt], w)
        return lin, (lambda x: theirs(x.bfloat16())), raw.nbytes, theirs_bytes
    scheme = "int8" if fmt == "int8" else f"{fmt}-asym"
    lin = int_linear(Q.quantize(w, Q.parse_scheme(scheme)), "int8")
    ours_bytes = lin.codes.nbytes + lin.scales.nbytes + lin.mins.nbytes
    theirs, theirs_bytes = _torch_int(fmt, w)
    return lin, (lambda x: theirs(x.bfloat16())), ours_bytes, theirs_bytes


@njit(nogil=True, cache=True, fastmath=True)  # fastmath: a vectorized sum, else one add per 4 cycles bounds it
def _read(a, lo, hi, out):
    s = np.float32(0.0)
    for i in range(lo * 4096, min(hi * 4096, a.size)):
        s += a[i]
    out[lo // 16] = s  # per part (pool rows are 16-aligned): never optimized away


@njit(nogil=True, cache=True, fastmath=True)
def _triad(a, b, c, lo, hi):
    for i in range(lo * 4096, min(hi * 4096, a.size)):
        a[i] = b[i] + np.float32(3.0) * c[i]


def memory_gbs(rounds: int) -> dict[str, float]:
    """Read-only stream and triad GB/s on the pool's threads (best of ``rounds``)."""
    n = STREAM_MIB * 2**20 // 4
    a, b, c = (np.ones(n, np.float32) for _ in range(3))
    out = np.zeros(n // 4096 // 16 + 1, np.float32)
    rows = -(-n // 4096)
    best = {"read": 0.0, "triad": 0.0}
    for _ in range(rounds):
        t = time.perf_counter()
        pool().run(lambda lo, hi: _read(a, lo, hi, out), rows)
        best["read"] = max(best["read"], a.nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        pool().run(lambda lo, hi: _triad(a, b, c, lo, hi), rows)
        best["triad"] = max(best["triad"], 3 * a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def worker_run(threads: int, formats: list[str], tokens: list[int], rounds: int, calls: int, ram_mib: int) -> dict:
    use_threads(threads)
    g = torch.Generator().manual_seed(0)
    samples: dict[str, list[float]] = {}
    nbytes: dict[str, int] = {}
    for fmt in formats:
        mats = []
        per_matrix = None
        while per_matrix is None or len(mats) * per_matrix < ram_mib * 2**20:
            out_f, in_f = SHAPES[len(mats) % 2]
            ours, theirs, ours_bytes, theirs_bytes = _pair(fmt, torch.randn(out_f, in_f, generator=g) * 0.02)
            mats.append((ours, theirs, in_f))
            per_matrix = ours_bytes
        for t in tokens:
            xs = {k: torch.randn(t, k, generator=g) for k in (1024, 3584)}
            for side, idx, per in (("offload", 0, ours_bytes), ("torch", 1, theirs_bytes)):
                nbytes[f"{fmt}|{t}|{side}"] = per
                for m in mats[:2]:  # warm-up: numba's first call, torch's allocator
                    m[idx](xs[m[2]])
        for _ in range(rounds):
            for t in tokens:
                xs = {k: torch.randn(t, k, generator=g) for k in (1024, 3584)}
                for side, idx in (("offload", 0), ("torch", 1)):
                    times = []
                    for i in range(calls):
                        m = mats[i % len(mats)]
                        start = time.perf_counter()
                        m[idx](xs[m[2]])
                        times.append(time.perf_counter() - start)
                    samples.setdefault(f"{fmt}|{t}|{side}", []).append(statistics.median(times))
        del mats
    return {"threads": threads, "loadavg": os.getloadavg(), "samples_s": samples, "bytes": nbytes,
            "memory_gbs": memory_gbs(rounds)}


def summarize(runs: list[dict]) -> dict:
    """threads -> format -> tokens -> side -> {gbs median, min, max}; plus memory GB/s per thread count."""
    summary: dict = {}
    for run in runs:
        th = summary.setdefault(str(run["threads"]), {"memory_gbs": {}, "formats": {}})
        for k, v in run["memory_gbs"].items():
            th["memory_gbs"].setdefault(k, []).append(v)
        for key, times in run["samples_s"].items():
            fmt, t, side = key.split("|")
            gbs = [run["bytes"][key] / s / 1e9 for s in times]
            th["formats"].setdefault(fmt, {}).setdefault(t, {}).setdefault(side, []).extend(gbs)
    for th in summary.values():
        th["memory_gbs"] = {k: round(statistics.median(v), 2) for k, v in th["memory_gbs"].items()}
        for per_t in th["formats"].values():
            for sides in per_t.values():
                for side, gbs in sides.items():
                    sides[side] = {"gbs": round(statistics.median(gbs), 2), "min": round(min(gbs), 2),
                                   "max": round(max(gbs), 2)}
    return summary


def table(summary: dict) -> str:
    lines = ["| threads | format | tokens | offload GB/s | torch GB/s | offload / torch |", "|---|---|---|---|---|---|"]
    for threads, th in summary.items():
        for fmt, per_t in th["formats"].items():
            for t, sides in per_t.items():
                ours, theirs = sides["offload"], sides["torch"]
                lines.append(f"| {threads} | {fmt} | {t} | {ours['gbs']:.1f} [{ours['min']:.1f}-{ours['max']:.1f}] | "
                             f"{theirs['gbs']:.1f} [{theirs['min']:.1f}-{theirs['max']:.1f}] | "
                             f"{ours['gbs'] / theirs['gbs']:.2f}x |")
        mem = th["memory_gbs"]
        lines.append(f"| {threads} | read stream / triad | | {mem['read']:.1f} / {mem['triad']:.1f} | | |")
    return "\n".join(lines) + "\n"


app = make_app(__doc__.splitlines()[0], no_args_is_help=False)


@app.command()
def bench(
    threads: Annotated[str, typer.Option(help="Thread counts, each in its own processes.")] = "1,2",
    formats: Annotated[str, typer.Option(help=f"Formats among {', '.join(FORMATS)}.")] = ",".join(FORMATS),
    tokens: Annotated[str, typer.Option(help="Token counts per call.")] = "1,4,16",
    processes: Annotated[int, typer.Option(help="Processes per thread count (alternating).")] = 2,
    rounds: Annotated[int, typer.Option(help="Rounds per process; methods take turns in each.")] = 3,
    calls: Annotated[int, typer.Option(help="Calls per method per round.")] = 40,
    ram_mib: Annotated[int, typer.Option(help="Bytes of matrix copies per format (> the last-level cache).")] = 96,
    worker: Annotated[int, typer.Option(hidden=True, help="Internal: run one worker at this thread count.")] = 0,
    out: Annotated[Path, typer.Option(help="JSON file to write (and a .md table beside it).")] = Path(
        "scripts/results/bench_kernels.json"),
) -> None:
    fmts, toks = [f.strip() for f in formats.split(",")], [int(t) for t in tokens.split(",")]
    unknown = set(fmts) - set(FORMATS)
    if unknown:
        raise typer.BadParameter(f"unknown format(s) {sorted(unknown)}: use some of {', '.join(FORMATS)}")
    if worker:
        print(json.dumps(worker_run(worker, fmts, toks, rounds, calls, ram_mib)))
        return
    params = {"threads": threads, "formats": fmts, "tokens": toks, "processes": processes, "rounds": rounds,
              "calls": calls, "ram_mib": ram_mib, "shapes": SHAPES, "stream_mib": STREAM_MIB}
    before = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "loadavg": os.getloadavg()}
    runs = []
    for _ in range(processes):
        for t in (int(x) for x in threads.split(",")):
            cmd = [sys.executable, __file__, "--worker", str(t), "--formats", ",".join(fmts), "--tokens",
                   ",".join(map(str, toks)), "--rounds", str(rounds), "--calls", str(calls), "--ram-mib", str(ram_mib)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                  env=dict(os.environ, OMP_NUM_THREADS=str(t)))
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  worker threads={t} done, load {runs[-1]['loadavg'][0]:.2f}", file=sys.stderr)
    summary = summarize(runs)
    write_results(out, {"machine": machine_info("numba", "llvmlite"), "load_before": before,
                        "load_after": os.getloadavg(), "params": params, "summary": summary, "runs": runs},
                  table(summary))


if __name__ == "__main__":
    main(app)
