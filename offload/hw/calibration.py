"""What this machine's memory, disk, CPU (and GPU) really do: measured once by ``offload bench-hw``, stored as a
small versioned JSON in the user's cache directory, and read by the per-miss cost model (hybrid.py) and the
performance model (perfmodel.py), which fall back to the documented defaults below when there is no file.

Conventions (so that numbers from different machines compare):

* bandwidths are bytes per second; a memory bandwidth counts every byte read and written (STREAM's
  convention: the triad ``a = b + 3c`` moves three arrays), so a memcpy of n bytes costs 2n of it;
* expert compute is a rate in expert parameters per second, per format (``bfloat16``, ``float32``: F.linear;
  ``int8``, ``int4``: torch's CPU weight-only kernels on bf16 activations) and per number of tokens routed to
  the expert. Parameters rather than bytes, because one number then serves every group size and the portable
  dequantizing layout (which runs at about its activation dtype's rate). The rate is that of the whole SwiGLU
  expert (gate, up, down and the activation), measured on the expert shape ``shape`` and rotated over enough
  copies that the weights come from RAM, not the last-level cache, as a miss's or a cold hit's do.

FreeToken (per-miss choice from a one-time bandwidth calibration) and MoE-Lens's performance model are the
ideas this follows; STREAM (McCalpin) is the memory benchmark.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from offload.errors import ConfigError
from offload.experts import quant
from offload.experts.layouts import DenseFormat, Expert, ExpertFormat, swiglu
from offload.files import write_json_atomic

log = logging.getLogger(__name__)

VERSION = 1
FORMATS = ("bfloat16", "float32", "int8", "int4")
BATCHES = (1, 4, 16, 64)  # one decode token, small decode batches, a prefill-sized one
Rates = Mapping[str, Mapping[int, float]]  # format -> tokens routed to the expert -> expert parameters per second

# Defaults. CPU: one token is shared/NOTES.md's 2-thread figure on this project's 2-core AMD EPYC (AVX2, torch
# 2.13, quiet machine: 465 us for a 3584x1024 bf16 matrix, 822 us float32, 240 us int8, 318 us int4); how the
# rate falls with more tokens (the matmul turning compute-bound) is a 1-thread measurement of the same shape on
# that machine under load, doubled for 2 threads: rough, which is why `offload bench-hw` exists.
# GPU: a consumer card on PCIe 4.0 x16 (25 GB/s pinned H2D, ~900 GB/s of GDDR6X, ~150 TFLOP/s of bf16).
DEFAULT_CPU_GEMV: dict[str, dict[int, float]] = {
    "bfloat16": {1: 7.9e9, 4: 7.9e9, 16: 3.5e9, 64: 1.0e9}, "float32": {1: 4.4e9, 4: 3.0e9, 16: 1.5e9, 64: 0.5e9},
    "int8": {1: 15e9, 4: 13e9, 16: 3.0e9, 64: 0.8e9}, "int4": {1: 11.5e9, 4: 10e9, 16: 3.0e9, 64: 0.8e9},
}
DEFAULT_GPU_GEMV: dict[str, dict[int, float]] = {  # memory-bound up to ~64 tokens, then ~150 TFLOP/s of bf16
    "bfloat16": {1: 350e9, 64: 300e9, 512: 140e9}, "float32": {1: 180e9, 64: 150e9, 512: 70e9},
    # the portable layout dequantizes through float32 (~14 bytes of traffic a parameter) before each matmul
    "int8": {1: 60e9, 64: 55e9, 512: 45e9}, "int4": {1: 60e9, 64: 55e9, 512: 45e9},
}
# A format a calibration has no rate for is computed at about this one's rate (float16 kernels are bf16's
# on both devices; quantized matrices on a GPU, or without a CPU kernel, dequantize into bf16 first).
FALLBACK = {"float16": "bfloat16", "int8": "bfloat16", "int4": "bfloat16", "float32": "bfloat16"}


def default_path() -> Path:
    """``$XDG_CACHE_HOME/offload/hardware.json``, else ``~/.cache/offload/hardware.json``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "offload" / "hardware.json"


def _seconds(rates: Mapping[int, float], tokens: int) -> float:
    """Seconds per expert parameter at ``tokens`` tokens: linear between measured batch sizes (a weight-streaming
    GEMV's time grows slowly with tokens, then linearly once compute-bound), constant below the smallest, and
    along the last segment's slope above the largest (one point only: time proportional to tokens past it, the
    conservative guess)."""
    points = sorted((b, 1.0 / r) for b, r in rates.items())
    if tokens <= points[0][0]:
        return points[0][1]
    for (b0, t0), (b1, t1) in zip(points, points[1:]):
        if tokens <= b1:
            return t0 + (t1 - t0) * (tokens - b0) / (b1 - b0)
    b1, t1 = points[-1]
    slope = t1 / b1 if len(points) == 1 else max((t1 - points[-2][1]) / (b1 - points[-2][0]), 0.0)
    return t1 + slope * (tokens - b1)


@dataclass(frozen=True)
class Calibration:
    """One machine's measured bandwidths and expert compute rates (defaults where not measured)."""

    host_memory_bandwidth: float = 20e9     # bytes/s read + written (STREAM triad)
    disk_read_bandwidth: float = 1.2e9      # bytes/s, O_DIRECT (page cache bypassed) sequential reads
    cpu_gemv: Rates = field(default_factory=lambda: DEFAULT_CPU_GEMV)  # format -> tokens -> parameters/s
    h2d_bandwidth: float = 25e9             # bytes/s, pinned host -> GPU
    roundtrip_latency_s: float = 30e-6      # one token's hidden state GPU -> host and an output back, synchronised
    gpu_memory_bandwidth: float = 900e9     # bytes/s read + written (device-to-device copy)
    gpu_gemv: Rates = field(default_factory=lambda: DEFAULT_GPU_GEMV)
    layer_overhead_s: float = 0.6e-3        # per decoder layer and decode token, beyond weight streaming (CPU;
    #                                         tiny-moe's 3-5 ms a token over 5 layers in shared/NOTES.md)
    gpu_layer_overhead_s: float = 0.2e-3    # ... on CUDA (Python, dispatch and ~30 kernel launches a layer)
    shape: tuple[int, int] = (1024, 3584)   # (hidden, intermediate) of the expert the rates were measured on
    measured: tuple[str, ...] = ()          # the fields measured on this machine; the others are defaults
    machine: Mapping[str, Any] = field(default_factory=dict)  # CPU, cores, GPU, versions, torch threads, load
    version: int = VERSION

    def __post_init__(self) -> None:
        for name in ("host_memory_bandwidth", "disk_read_bandwidth", "h2d_bandwidth", "gpu_memory_bandwidth"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"calibration: {name} must be > 0, got {getattr(self, name)!r}")
        if min(self.layer_overhead_s, self.gpu_layer_overhead_s, self.roundtrip_latency_s) < 0:
            raise ConfigError("calibration: latencies and overheads must be >= 0")
        for name in ("cpu_gemv", "gpu_gemv"):
            rates = getattr(self, name)
            if not rates or any(not r or min(r) < 1 or not all(v > 0 for v in r.values()) for r in rates.values()):
                raise ConfigError(f"calibration: {name} needs positive rates at token counts >= 1")

    def cpu_expert_s(self, fmt: str, params: int, tokens: int) -> float:
        """Seconds for the CPU to run one expert of ``params`` parameters in ``fmt`` over ``tokens`` tokens."""
        return params * _seconds(_rates(self.cpu_gemv, fmt), tokens)

    def gpu_expert_s(self, fmt: str, params: int, tokens: int) -> float:
        """Seconds for the GPU to run one expert (quantized ones through the portable dequantizing layout)."""
        return params * _seconds(_rates(self.gpu_gemv, fmt), tokens)

    # -- the file ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("cpu_gemv", "gpu_gemv"):
            out[name] = {f: {str(b): r for b, r in sorted(rates.items())} for f, rates in getattr(self, name).items()}
        out["shape"], out["measured"] = list(self.shape), list(self.measured)  # as JSON has them
        return {"format": "offload-calibration", **out}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str = "calibration") -> Calibration:
        """Parse a saved calibration; a malformed one raises ConfigError naming ``where``."""
        hint = "run `offload bench-hw` again, or delete the file to use the defaults"
        try:
            fields = {k: v for k, v in obj.items() if k != "format"}
            for name in ("cpu_gemv", "gpu_gemv"):
                fields[name] = {f: {int(b): float(r) for b, r in rates.items()} for f, rates in fields[name].items()}
            fields["shape"] = tuple(fields["shape"])
            fields["measured"] = tuple(fields.get("measured", ()))
            return cls(**fields)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where} is not a valid calibration ({type(e).__name__}: {e})", hint) from None

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Calibration:
        """The calibration at ``path`` (default: :func:`default_path`); the defaults when there is none, or when
        it was written by another version of this format (an upgrade never stops a run; a warning says so)."""
        path = Path(path) if path is not None else default_path()
        if not path.is_file():
            return cls()
        try:
            obj = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e})", "run `offload bench-hw` again") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{path} is not a calibration object", "run `offload bench-hw` again")
        if obj.get("version") != VERSION:
            log.warning("%s has calibration version %r, this offload reads %d: using the defaults (run "
                        "`offload bench-hw` again)", path, obj.get("version"), VERSION)
            return cls()
        return cls.from_json(obj, str(path))

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the calibration (atomically: a reader never sees half a file) and return where."""
        path = Path(path) if path is not None else default_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.to_json())
        return path


def _rates(table: Rates, fmt: str) -> Mapping[int, float]:
    seen = fmt
    while fmt not in table:
        if fmt not in FALLBACK or FALLBACK[fmt] == fmt:
            raise ConfigError(f"the calibration has no expert rate for {seen!r}", f"it has {sorted(table)}")
        fmt = FALLBACK[fmt]
    return table[fmt]


def gemv_format(fmt: ExpertFormat, compute_dtype: torch.dtype, activations: torch.dtype, device: str) -> str:
    """The calibration key an expert computes at: the compute dtype for float experts; a quantized expert's kernel
    on the CPU with bf16 activations where one runs it (as its slot layout picks), else the dequantizing layout,
    which runs at about the activation dtype's rate (on CUDA: the measured dequantizing rate of its bits)."""
    if isinstance(fmt, DenseFormat):
        return str(compute_dtype).removeprefix("torch.")
    scheme = fmt.scheme  # type: ignore[attr-defined]
    if device == "cuda":
        return f"int{scheme.bits}"
    return f"int{scheme.bits}" if activations == torch.bfloat16 else str(activations).removeprefix("torch.")


def host_copy_format(fmt: ExpertFormat, compute_dtype: torch.dtype, activations: torch.dtype, device: str) -> str:
    """The key a missed expert's host copy computes at on the CPU (hybrid's CPU side). The RAM tier holds experts in
    the device's slot layout: on CUDA a quantized expert is then in the portable dequantizing layout, which the CPU
    runs at about its activation dtype's rate, not at the int4/int8 kernels' (a second host copy in the CPU kernel's
    layout would: pass its key to the cost model instead)."""
    if device == "cuda" and not isinstance(fmt, DenseFormat):
        return str(activations).removeprefix("torch.")
    return gemv_format(fmt, compute_dtype, activations, "cpu")


# ===================================================================================== measurements


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


def measure_disk_bandwidth(directory: Path, nbytes: int, repeats: int, chunk: int = 16 * 2**20) -> tuple[float, str]:
    """Sequential reads of a temporary file written in ``directory`` (removed after), with the runtime's own
    reader: (best bytes/s over ``repeats`` passes, the reader's mode). Mode "direct" is O_DIRECT; "fadvise" or
    "plain" mean the file system refused it (tmpfs), so the figure is nearer the page cache's."""
    from offload.memory.transfer import ALIGN, DirectReader, aligned_empty  # the disk tier's reader, not a lookalike

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
        reader.drop_cache([path])
        buf = aligned_empty(chunk)
        best = float("inf")
        for _ in range(repeats):
            reader.drop_cache([path])
            t0 = time.perf_counter()
            for offset in range(0, nbytes, chunk):
                reader.read(path, offset, offset + chunk, buf)
            best = min(best, time.perf_counter() - t0)
        return nbytes / best, reader.mode_of(path)
    finally:
        reader.close()
        path.unlink(missing_ok=True)


def _int_group(hidden: int, intermediate: int) -> int | None:
    """The int4 group the kernel can run on all three matrices of the shape (128 preferred, as checkpoints)."""
    return next((g for g in (128, 64, 32, 256) if quant.int4_kernel_group(intermediate, hidden, g) == g
                 and quant.int4_kernel_group(hidden, intermediate, g) == g), None)


def _linear(fmt: str, w: torch.Tensor, group: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """One projection in ``fmt`` from a float32 weight [out, in], as the runtime's CPU slot layouts compute it."""
    if fmt in ("bfloat16", "float32", "float16"):
        weight = w.to(getattr(torch, fmt))
        return lambda x: F.linear(x, weight)
    if fmt == "int8":
        w8, scales = quant.int8_kernel_pack(quant.quantize(w, quant.QuantScheme(8, None, True)))
        return lambda x: quant.int8_linear(x, w8, scales)
    packed, sz = quant.int4_kernel_pack(quant.quantize(w, quant.QuantScheme(4, group, False)))
    kernel_group = quant.int4_kernel_group(*w.shape, group)
    return lambda x: quant.int4_linear(x, packed, kernel_group, sz)


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


def measure_layer_overhead(calibration: Calibration, device: str = "cpu", tokens: int = 24) -> float:
    """Seconds per decoder layer per decode token that weight streaming does not explain (Python, dispatch,
    kernel launches, attention on a short context), from decoding with the bundled tiny-moe fully cached: its
    weights are 21 MB, so nearly all of its time is this overhead. The rest, as the performance model predicts
    it from ``calibration``, is subtracted."""
    import offload  # the runtime itself: the overhead is its own
    from offload.hw.perfmodel import ModelSizes, token_cost

    m = offload.from_pretrained("tiny-moe", device=device, expert_budget="100%", offload_to="ram")
    ids = torch.tensor([[1, 2, 3, 4]])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(new: int) -> float:
        sync()
        t0 = time.perf_counter()
        m.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=[])
        sync()
        return time.perf_counter() - t0

    run(tokens)  # warm-up: every expert it uses is cached after this
    per_token = min((run(tokens + 1) - run(1)) / tokens for _ in range(3))
    sizes = ModelSizes.from_plan(m.plan, device)
    streaming = token_cost(sizes, replace(calibration, layer_overhead_s=0.0, gpu_layer_overhead_s=0.0), device,
                           "ram", 0.0).seconds
    m.cache.close()
    return max(per_token - streaming, 0.0) / m.spec.num_layers


Progress = Callable[[str], None]


def calibrate(hidden: int = 1024, intermediate: int = 3584, disk_dir: Path | None = None,
              formats: Sequence[str] = FORMATS, batches: Sequence[int] = BATCHES, sizes: BenchSizes | None = None,
              cuda: bool | None = None, progress: Progress | None = None) -> tuple[Calibration, list[str]]:
    """Measure everything ``offload bench-hw`` reports: (the calibration, notes on what could not be measured).

    ``disk_dir``: where the temporary file goes (default: the calibration file's folder, which is on the disk a
    user's cache lives on). ``cuda``: measure the GPU too (default: when there is one). A format not measured
    keeps its default rate; ``measured`` lists what was.
    """
    from offload.hw.machine import machine_info

    sizes, step = sizes or BenchSizes(), progress or (lambda what: None)
    disk_dir = disk_dir or default_path().parent
    cuda = torch.cuda.is_available() if cuda is None else cuda
    step("host memory bandwidth (triad)")
    fields: dict[str, Any] = {"host_memory_bandwidth": measure_memory_bandwidth(sizes.memory_bytes, sizes.repeats)}
    step("disk read bandwidth (O_DIRECT)")
    fields["disk_read_bandwidth"], mode = measure_disk_bandwidth(disk_dir, sizes.disk_bytes, sizes.repeats)
    notes = [] if mode == "direct" else [f"disk: O_DIRECT was refused in {disk_dir}, read with {mode} (nearer the "
                                         "page cache's speed than the disk's): give --path on the checkpoints' disk"]
    step("CPU expert throughput")
    cpu, gemv_notes = measure_cpu_gemv(hidden, intermediate, formats, batches, sizes)
    fields["cpu_gemv"] = {**DEFAULT_CPU_GEMV, **cpu}
    step("the runtime's per-layer overhead (tiny-moe)")
    fields["layer_overhead_s"] = measure_layer_overhead(Calibration(**fields))
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
