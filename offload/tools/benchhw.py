"""``offload bench-hw``: measure this machine's memory, disk, CPU (and GPU) once, and write the calibration record
(hw/calibration.py) that the cost and performance models read.

The measurements use the runtime itself (the disk tier's reader, the CPU slot layouts' kernels, tiny-moe decoding
for the per-layer overhead), which is why they live here, above the runtime, apart from the record.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from offload.errors import ConfigError
from offload.experts import quant
from offload.experts.activations import swiglu
from offload.experts.kernels.linear import int_kernel_runs, int_linear
from offload.experts.layouts import DenseLinear, Expert
from offload.hw.calibration import BATCHES, DEFAULT_CPU_GEMV, DEFAULT_GPU_GEMV, FORMATS, Calibration, default_path
from offload.hw.machine import machine_info
from offload.hw.perfmodel import token_cost
from offload.memory.transfer import ALIGN, DirectReader, aligned_empty
from offload.runtime.load import from_pretrained
from offload.tools.plan import model_sizes


@dataclass(frozen=True)
class BenchSizes:
    """How much each measurement moves: large enough to leave the caches, small enough to take seconds."""

    memory_bytes: int = 128 * 2**20   # per triad array (4x a 32 MiB last-level cache), and the H2D / D2D copies
    disk_bytes: int = 256 * 2**20     # the temporary file read back with O_DIRECT
    gemv_bytes: int = 128 * 2**20     # expert copies rotated per format (at least one; at most 32)
    repeats: int = 5                  # memory / disk / H2D passes (the best is kept, as STREAM does)
    gemv_repeats: int = 5             # passes over the expert copies (the lower quartile of the calls is kept)


def measure_memory_bandwidth(nbytes: int, repeats: int) -> float:
    """STREAM triad a = b + 3c on float32 arrays of ``nbytes`` each with torch's threads: 3 * nbytes / best time."""
    n = max(nbytes // 4, 1024)
    a, b, c = torch.empty(n), torch.ones(n), torch.full((n,), 2.0)
    torch.add(b, c, alpha=3.0, out=a)  # first touch: page faults are not bandwidth
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = min(best, time.perf_counter() - t0)
    return 3 * n * 4 / best


@dataclass(frozen=True)
class DiskRates:
    """What ``offload bench-hw`` measured of the disk: the reader's sequential rate and what one request costs."""

    bandwidth: float   # bytes/s of 16 MiB reads back to back
    request_s: float   # seconds of one 4 KiB read at a random place (the latency each extra read of a miss adds)
    mode: str          # the reader's mode: "direct" (O_DIRECT) or a fallback nearer the page cache's speed


def measure_copy_bandwidth(nbytes: int, repeats: int, chunk: int = 16 * 2**20) -> float:
    """Bytes/s one thread copies with the CPU mover's own copy (numpy's memcpy), ``chunk`` at a time between
    ``nbytes`` of sources and as many of destinations, so that each copy reads and writes RAM (as a slot's fill
    does): the best pass over ``repeats``."""
    chunk = min(chunk, nbytes)
    count = max(2, nbytes // chunk)
    sources = [np.ones(chunk, dtype=np.uint8) for _ in range(count)]
    dests = [np.zeros(chunk, dtype=np.uint8) for _ in range(count)]
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass faults the pages in
        t0 = time.perf_counter()
        for src, dest in zip(sources, dests, strict=True):
            np.copyto(dest, src)
        best = min(best, time.perf_counter() - t0)
    return count * chunk / best


def measure_disk(directory: Path, nbytes: int, repeats: int, chunk: int = 16 * 2**20,
                 requests: int = 64) -> DiskRates:
    """Reads of a temporary file written in ``directory`` (removed after), with the runtime's own reader: the best
    sequential bytes/s over ``repeats`` passes, and the median time of ``requests`` single-block reads at random
    aligned places (page cache dropped first). Mode "direct" is O_DIRECT; "fadvise" or "plain" mean the file system
    refused it (tmpfs), so the figures are nearer the page cache's."""

    chunk = max(ALIGN, chunk - chunk % ALIGN)
    nbytes = max(chunk, nbytes - nbytes % chunk)
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="offload-bench-hw-", suffix=".bin", dir=directory)
    path, reader = Path(name), DirectReader()
    try:
        block = os.urandom(chunk)
        with os.fdopen(fd, "wb") as f:
            for _ in range(nbytes // chunk):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        buf = aligned_empty(chunk)
        best = float("inf")
        for _ in range(repeats):
            reader.drop_cache([path])
            t0 = time.perf_counter()
            for offset in range(0, nbytes, chunk):
                reader.read(path, offset, offset + chunk, buf)
            best = min(best, time.perf_counter() - t0)
        reader.drop_cache([path])
        places = random.Random(0).sample(range(nbytes // ALIGN), min(requests, nbytes // ALIGN))
        times = []
        for place in places:
            t0 = time.perf_counter()
            reader.read(path, place * ALIGN, (place + 1) * ALIGN, buf)
            times.append(time.perf_counter() - t0)
        return DiskRates(nbytes / best, statistics.median(times), reader.mode_of(path))
    finally:
        reader.close()
        path.unlink(missing_ok=True)


def _int_group(hidden: int, intermediate: int) -> int | None:
    """The int4 group the kernels can run on all three matrices of the shape (128 preferred, as checkpoints)."""
    return next((g for g in (128, 64, 32, 256) if int_kernel_runs(hidden, g) and int_kernel_runs(intermediate, g)),
                None)


def _linear(fmt: str, w: torch.Tensor, group: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """One projection in ``fmt`` from a float32 weight [out, in], as the runtime's CPU slot layouts compute it
    (integer formats with the default int8 activations)."""
    if fmt in ("bfloat16", "float32", "float16"):
        return DenseLinear(w.to(getattr(torch, fmt)).contiguous())  # offload's float GEMV at decode
    q = quant.quantize(w, quant.QuantScheme(8, None, True) if fmt == "int8" else quant.QuantScheme(4, group, False))
    return int_linear(q, "int8")


def _experts(fmt: str, hidden: int, intermediate: int, copies: int, group: int | None) -> list[Expert]:
    g = torch.Generator().manual_seed(0)
    shapes = ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate))
    return [Expert(*(_linear(fmt, torch.randn(s, generator=g) * 0.02, group) for s in shapes)) for _ in range(copies)]


def _expert_nbytes(fmt: str, hidden: int, intermediate: int) -> int:
    per_param = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}[fmt]
    return int(3 * hidden * intermediate * per_param)


def _lower_quartile(times: list[float]) -> float:
    """The call time kept: on a shared machine the slow calls are other processes' doing (a descheduled OpenMP
    thread stalls a 2-thread matmul for a whole scheduler tick), so the lower quartile, not the median."""
    return statistics.quantiles(times, n=4)[0] if len(times) >= 4 else min(times)


def measure_cpu_gemv(hidden: int, intermediate: int, formats: Sequence[str], batches: Sequence[int],
                     sizes: BenchSizes) -> tuple[dict[str, dict[int, float]], list[str]]:
    """Expert parameters per second of the SwiGLU expert on the CPU, per format and tokens; and notes (formats
    the kernels cannot run on this shape). Copies rotate so the weights stream from RAM."""
    rates: dict[str, dict[int, float]] = {}
    notes: list[str] = []
    group = _int_group(hidden, intermediate)
    for fmt in formats:
        if fmt not in FORMATS:
            raise ConfigError(f"unknown expert format {fmt!r} to measure", f"use some of: {', '.join(FORMATS)}")
        if fmt == "int4" and group is None:
            notes.append(f"int4: the CPU kernel cannot run a {hidden}x{intermediate} expert; default kept")
            continue
        copies = max(1, min(32, sizes.gemv_bytes // _expert_nbytes(fmt, hidden, intermediate)))
        try:
            experts = _experts(fmt, hidden, intermediate, copies, group)
            rates[fmt] = {tokens: 3 * hidden * intermediate / _time_expert(experts, fmt, hidden, tokens, sizes)
                          for tokens in batches}
        except (RuntimeError, NotImplementedError) as e:  # a torch build without this CPU kernel
            notes.append(f"{fmt}: this torch cannot run its CPU kernel ({type(e).__name__}: {str(e)[:80]}); "
                         "default kept")
    return rates, notes


def _time_expert(experts: Sequence[Expert], fmt: str, hidden: int, tokens: int, sizes: BenchSizes) -> float:
    """Seconds of one SwiGLU expert call over ``tokens`` tokens, the copies rotated (the lower quartile)."""
    x = torch.randn(tokens, hidden).to(torch.float32 if fmt == "float32" else torch.bfloat16)  # kernels: bf16
    for e in experts[:2]:
        swiglu(e, x)  # warm-up: kernels' first-call setup
    times = []
    for _ in range(sizes.gemv_repeats):
        for e in experts:
            t0 = time.perf_counter()
            swiglu(e, x)
            times.append(time.perf_counter() - t0)
    return _lower_quartile(times)


def _cuda_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call of ``fn`` on the current stream, by CUDA events (kernels run asynchronously)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def measure_cuda_transfers(sizes: BenchSizes, hidden: int) -> dict[str, float]:
    """Pinned H2D bandwidth, one token's host round trip (D2H of a hidden state, H2D of an output, synchronised,
    as the CPU branch of a hybrid miss pays it) and device memory bandwidth (a D2D copy counts 2 bytes a byte)."""
    n = sizes.memory_bytes
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev, dev2 = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    h2d = min(_cuda_time(lambda: dev.copy_(host, non_blocking=True), 1) for _ in range(sizes.repeats))
    d2d = min(_cuda_time(lambda: dev2.copy_(dev), 1) for _ in range(sizes.repeats))
    x = torch.zeros(1, hidden, dtype=torch.bfloat16, device="cuda")
    back = torch.empty(1, hidden, dtype=torch.bfloat16, pin_memory=True)
    rounds = []
    for _ in range(50):
        t0 = time.perf_counter()
        back.copy_(x, non_blocking=True)
        torch.cuda.synchronize()
        x.copy_(back, non_blocking=True)
        torch.cuda.synchronize()
        rounds.append(time.perf_counter() - t0)
    return {"h2d_bandwidth": n / h2d, "gpu_memory_bandwidth": 2 * n / d2d,
            "roundtrip_latency_s": statistics.median(rounds)}


def _gpu_expert(fmt: str, hidden: int, intermediate: int, seed: int) -> Expert:
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=g) * 0.02 for s in ((intermediate, hidden), (intermediate, hidden),
                                                            (hidden, intermediate))]
    if fmt not in ("int8", "int4"):
        return Expert.dense(*(w.to("cuda", getattr(torch, fmt)) for w in weights))
    group = _int_group(hidden, intermediate)
    scheme = quant.QuantScheme(8, None, True) if fmt == "int8" else quant.QuantScheme(4, group, False)
    qs = [quant.quantize(w, scheme) for w in weights]
    qs = [replace(q, codes=q.codes.cuda(), scales=q.scales.cuda(), zeros=q.zeros.cuda()) for q in qs]
    return Expert(*((lambda x, q=q: F.linear(x, quant.dequantize(q, x.dtype))) for q in qs))


def measure_gpu_gemv(hidden: int, intermediate: int, formats: Sequence[str], batches: Sequence[int],
                     sizes: BenchSizes) -> dict[str, dict[int, float]]:
    """Expert parameters per second on the GPU: float experts with F.linear, quantized ones as the portable
    layout computes them there (dequantize into bf16 per matmul, then F.linear)."""
    rates: dict[str, dict[int, float]] = {}
    for fmt in formats:
        copies = max(1, min(32, sizes.gemv_bytes // _expert_nbytes(fmt, hidden, intermediate)))  # past the L2
        experts = [_gpu_expert(fmt, hidden, intermediate, seed) for seed in range(copies)]
        dtype = torch.float32 if fmt == "float32" else torch.bfloat16
        rates[fmt] = {}
        for tokens in batches:
            x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
            seconds = _cuda_time(lambda x=x, es=experts: [swiglu(e, x) for e in es], sizes.gemv_repeats) / copies
            rates[fmt][tokens] = 3 * hidden * intermediate / seconds
    return rates


def _generate(model, new: int, sync: Callable[[], object] = lambda: None) -> tuple[float, int]:
    """Seconds and cache misses of one greedy generate of ``new`` tokens after a 4-token prompt."""
    model.stats.reset()
    sync()
    t0 = time.perf_counter()
    model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=new, do_sample=False, eos_token_id=[])
    sync()
    return time.perf_counter() - t0, model.stats.total.misses


def _per_decode_token(model, tokens: int, sync: Callable[[], object] = lambda: None) -> tuple[float, float]:
    """Seconds and misses per decode token (``tokens`` more against one, the least time of three pairs) after a
    warm-up generate."""
    _generate(model, tokens, sync)
    pairs = ((_generate(model, tokens + 1, sync), _generate(model, 1, sync)) for _ in range(3))
    return min(((a[0] - b[0]) / tokens, (a[1] - b[1]) / tokens) for a, b in pairs)


def measure_layer_overhead(calibration: Calibration, device: str = "cpu", tokens: int = 24) -> float:
    """Seconds per decoder layer per decode token that weight streaming does not explain (Python, dispatch,
    kernel launches, attention on a short context), from decoding with the bundled tiny-moe fully cached: its
    weights are 21 MB, so nearly all of its time is this overhead. The rest, as the performance model predicts
    it from ``calibration``, is subtracted."""

    m = from_pretrained("tiny-moe", device=device, expert_budget="100%", offload_to="ram")
    per_token, _ = _per_decode_token(m, tokens, torch.cuda.synchronize if device == "cuda" else (lambda: None))
    sizes = model_sizes(m.plan, device)
    streaming = token_cost(sizes, replace(calibration, layer_overhead_s=0.0, gpu_layer_overhead_s=0.0), device,
                           "ram", 0.0).seconds
    m.cache.close()
    return max(per_token - streaming, 0.0) / m.spec.num_layers


def measure_miss_overhead(calibration: Calibration, tokens: int = 24, budget: str = "25%") -> float:
    """Seconds a RAM-tier miss costs beyond its modelled copy (the cache's bookkeeping, the victim's eviction, the
    first touches of a refilled slot), from tiny-moe decoding on the CPU at ``budget`` against fully cached: the
    extra time per miss, less the copy the performance model already charges."""
    full = from_pretrained("tiny-moe", device="cpu", expert_budget="100%", offload_to="ram")
    full_s, _ = _per_decode_token(full, tokens)
    full.cache.close()
    partial = from_pretrained("tiny-moe", device="cpu", expert_budget=budget, offload_to="ram")
    partial_s, misses = _per_decode_token(partial, tokens)
    copy = partial.cache.slot_nbytes / calibration.host_copy_bandwidth  # what ExpertCostModel.copy_s charges
    partial.cache.close()
    return max((partial_s - full_s) / misses - copy, 0.0) if misses > 0 else 0.0


Progress = Callable[[str], None]


def calibrate(hidden: int = 1024, intermediate: int = 3584, disk_dir: Path | None = None,
              formats: Sequence[str] = FORMATS, batches: Sequence[int] = BATCHES, sizes: BenchSizes | None = None,
              cuda: bool | None = None, progress: Progress | None = None) -> tuple[Calibration, list[str]]:
    """Measure everything ``offload bench-hw`` reports: (the calibration, notes on what could not be measured).

    ``disk_dir``: where the temporary file goes (default: the calibration file's folder, which is on the disk a
    user's cache lives on). ``cuda``: measure the GPU too (default: when there is one). A format not measured
    keeps its default rate; ``measured`` lists what was.
    """

    sizes, step = sizes or BenchSizes(), progress or (lambda what: None)
    disk_dir = disk_dir or default_path().parent
    cuda = torch.cuda.is_available() if cuda is None else cuda
    step("host memory bandwidth (triad)")
    fields: dict[str, Any] = {"host_memory_bandwidth": measure_memory_bandwidth(sizes.memory_bytes, sizes.repeats)}
    step("host copy bandwidth (one thread)")
    fields["host_copy_bandwidth"] = measure_copy_bandwidth(sizes.memory_bytes, sizes.repeats)
    step("disk read bandwidth (O_DIRECT)")
    disk = measure_disk(disk_dir, sizes.disk_bytes, sizes.repeats)
    fields["disk_read_bandwidth"], fields["disk_request_s"], mode = disk.bandwidth, disk.request_s, disk.mode
    notes = [] if mode == "direct" else [f"disk: O_DIRECT was refused in {disk_dir}, read with {mode} (nearer the "
                                         "page cache's speed than the disk's): give --path on the checkpoints' disk"]
    step("CPU expert throughput")
    cpu, gemv_notes = measure_cpu_gemv(hidden, intermediate, formats, batches, sizes)
    fields["cpu_gemv"] = {**DEFAULT_CPU_GEMV, **cpu}
    step("the runtime's per-layer overhead (tiny-moe)")
    fields["layer_overhead_s"] = measure_layer_overhead(Calibration(**fields))
    step("the runtime's cost per miss beyond the copy (tiny-moe)")
    fields["miss_overhead_s"] = measure_miss_overhead(Calibration(**fields))
    measured = [*fields, *(f"cpu_gemv.{f}" for f in cpu)]
    measured.remove("cpu_gemv")
    if cuda:
        step("pinned H2D bandwidth, GPU memory bandwidth, host round trip")
        transfers = measure_cuda_transfers(sizes, hidden)
        step("GPU expert throughput")
        gpu = measure_gpu_gemv(hidden, intermediate, formats, (*batches, 256), sizes)
        fields |= {**transfers, "gpu_gemv": {**DEFAULT_GPU_GEMV, **gpu}}
        step("the runtime's per-layer overhead on CUDA (tiny-moe)")
        fields["gpu_layer_overhead_s"] = measure_layer_overhead(Calibration(**fields), "cuda")
        measured += [*transfers, *(f"gpu_gemv.{f}" for f in gpu), "gpu_layer_overhead_s"]
    else:
        notes.append("no CUDA device: the H2D, round-trip and GPU figures are the defaults")
    machine = {**machine_info(), "torch_threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()),
               "disk_dir": str(disk_dir), "disk_read_mode": mode, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return Calibration(**fields, shape=(hidden, intermediate), measured=tuple(measured), machine=machine), \
        notes + gemv_notes
