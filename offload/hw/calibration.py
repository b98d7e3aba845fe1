"""What this machine's memory, disk, CPU (and GPU) really do: measured once by ``offload bench-hw``, stored as a
small versioned JSON in the user's cache directory, and read by the per-miss cost model (hw/costmodel.py) and the
performance model (hw/perfmodel.py), which fall back to the documented defaults below when there is no file.

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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from offload.errors import ConfigError
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
    host_copy_bandwidth: float = 11e9       # bytes/s copied by one thread's memcpy (a CPU slot's fill from RAM)
    disk_read_bandwidth: float = 1.2e9      # bytes/s, O_DIRECT (page cache bypassed) sequential reads
    disk_request_s: float = 0.3e-3          # seconds one O_DIRECT read request costs beyond its bytes (4 KiB at
    #                                         random places: what an expert stored in several pieces pays again)
    cpu_gemv: Rates = field(default_factory=lambda: DEFAULT_CPU_GEMV)  # format -> tokens -> parameters/s
    h2d_bandwidth: float = 25e9             # bytes/s, pinned host -> GPU
    roundtrip_latency_s: float = 30e-6      # one token's hidden state GPU -> host and an output back, synchronised
    gpu_memory_bandwidth: float = 900e9     # bytes/s read + written (device-to-device copy)
    gpu_gemv: Rates = field(default_factory=lambda: DEFAULT_GPU_GEMV)
    layer_overhead_s: float = 0.6e-3        # per decoder layer and decode token, beyond weight streaming (CPU;
    #                                         tiny-moe's 3-5 ms a token over 5 layers in shared/NOTES.md)
    gpu_layer_overhead_s: float = 0.2e-3    # ... on CUDA (Python, dispatch and ~30 kernel launches a layer)
    miss_overhead_s: float = 0.2e-3         # per miss beyond moving its bytes: the cache's bookkeeping, the eviction,
    #                                         a refilled slot's first touches (tiny-moe in the RAM tier on the 2-core
    #                                         EPYC: 0.11-0.22 ms)
    shape: tuple[int, int] = (1024, 3584)   # (hidden, intermediate) of the expert the rates were measured on
    measured: tuple[str, ...] = ()          # the fields measured on this machine; the others are defaults
    machine: Mapping[str, Any] = field(default_factory=dict)  # CPU, cores, GPU, versions, torch threads, load
    version: int = VERSION

    def __post_init__(self) -> None:
        for name in ("host_memory_bandwidth", "host_copy_bandwidth", "disk_read_bandwidth", "h2d_bandwidth",
                     "gpu_memory_bandwidth"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"calibration: {name} must be > 0, got {getattr(self, name)!r}")
        if min(self.layer_overhead_s, self.gpu_layer_overhead_s, self.roundtrip_latency_s, self.disk_request_s,
               self.miss_overhead_s) < 0:
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
