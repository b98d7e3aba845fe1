"""Weight-only quantization of expert matrices: the math, torch's CPU kernel layouts, and released file formats.

One canonical in-memory form, ``QuantizedWeight``: unsigned codes [out, in], and per (row, group of consecutive
inputs) a float32 scale and an integer-valued zero point in code space, so that W = scales * (codes - zeros).
Everything else converts to or from it:

* torch's CPU weight-only kernels: ``_weight_int8pack_mm`` (int8, per-channel symmetric) and
  ``_weight_int4pack_mm_for_cpu`` (int4, groups of 32..256, tinygemm's (q - 8) * scale + zero), with a fast
  converter from plain nibble packing to the int4 kernel's layout, so a cache miss costs a shuffle, not a repack;
* GPTQ (AutoGPTQ / GPTQModel ``checkpoint_format: "gptq"``, v1) and compressed-tensors ``pack-quantized``
  (llm-compressor's w4a16 / w8a16, Kimi-K2's int4), as their libraries write them.

Symmetric schemes use zero point 2^(bits-1) (8 for int4, 128 for int8) and scale = 2 * absmax / (2^bits - 1),
the convention of both GPTQ and compressed-tensors: absmax maps to 7.5 steps, so the grid spans [-8, 7] steps.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F

from offload.errors import CheckpointError, ConfigError, UnsupportedModelError

log = logging.getLogger(__name__)

INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts
CLIP_RATIOS = tuple(1 - 0.02 * i for i in range(26))  # 1.0 .. 0.5: finer grids gained < 0.1% (see quantize)


# ================================================================================================ scheme + form


@dataclass(frozen=True)
class QuantScheme:
    """How a matrix is quantized: bits, group of consecutive inputs sharing a scale (None: the whole row), symmetry.

    Any group size is valid here (checkpoints use many); what a kernel accepts is checked where it is packed.
    """

    bits: int = 4
    group_size: int | None = 128  # None: one scale per output row (per-channel)
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ConfigError(f"quantization group_size must be a positive integer or None, got {self.group_size!r}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def mid(self) -> int:
        """The symmetric zero point: 8 for int4, 128 for int8."""
        return 1 << (self.bits - 1)

    def groups(self, in_features: int) -> int:
        """Groups per row; raises when the group size does not divide ``in_features``."""
        group = self.group_size or in_features
        if in_features % group:
            raise ConfigError(f"quantization group_size {group} does not divide the input dimension {in_features}",
                              "pick a group size that divides every quantized matrix's input dimension")
        return in_features // group

    def __str__(self) -> str:
        group = "" if self.group_size is None else f"-g{self.group_size}"
        return f"int{self.bits}{group}-{'sym' if self.symmetric else 'asym'}"


_SCHEME_RE = re.compile(r"int(?P<bits>\d+)(?:-g(?P<group>\d+))?(?:-(?P<sym>sym|asym))?")


def parse_scheme(text: str) -> QuantScheme:
    """A CLI spelling -> scheme: "int8" (per-channel symmetric), "int4" (= int4-g128-sym), "int4-g32-asym", ...

    Only what torch's CPU kernels run is accepted here: int8 per-channel symmetric, int4 groups 32..256.
    """
    hint = "use int8, or int4 with -g32/-g64/-g128/-g256 and -sym/-asym, e.g. int4-g128-asym"
    m = _SCHEME_RE.fullmatch(text.strip().lower())
    if m is None:
        raise ConfigError(f"unknown quantization {text!r}", hint)
    bits, group, sym = int(m["bits"]), m["group"], m["sym"] != "asym"
    if bits == 8:
        if group is not None or not sym:
            raise ConfigError(f"quantization {text!r}: int8 is per-channel symmetric only", hint)
        return QuantScheme(8, None, True)
    if bits != 4:
        raise ConfigError(f"quantization {text!r}: bits must be 4 or 8", hint)
    group_size = 128 if group is None else int(group)
    if group_size not in INT4_KERNEL_GROUPS:
        raise ConfigError(f"quantization {text!r}: int4 group size must be 32, 64, 128 or 256", hint)
    return QuantScheme(4, group_size, sym)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized [out, in] matrix: W = scales * (codes - zeros), one scale and zero per row and input group."""

    codes: torch.Tensor   # uint8 [out, in], values 0 .. 2^bits - 1
    scales: torch.Tensor  # float32 [out, groups]
    zeros: torch.Tensor   # float32 [out, groups], integer values in 0 .. 2^bits - 1 (code space)
    scheme: QuantScheme

    def __post_init__(self) -> None:
        out, in_ = self.codes.shape
        groups = self.scheme.groups(in_)
        if self.codes.dtype != torch.uint8:
            raise ValueError(f"codes must be uint8, got {self.codes.dtype}")
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            if t.dtype != torch.float32 or tuple(t.shape) != (out, groups):
                raise ValueError(f"{name} must be float32 [{out}, {groups}], got {t.dtype} {list(t.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def group_size(self) -> int:
        """The effective group size (the whole row for per-channel schemes)."""
        return self.scheme.group_size or self.codes.shape[1]


# ================================================================================================ quantize


def _grid(x: torch.Tensor, scheme: QuantScheme, ratio: float, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each group for a clipping ratio. x: [out, groups, group] -> two [out, groups, 1]."""
    if scheme.symmetric:
        amax = x.abs().amax(-1, keepdim=True) * ratio
        scale = (2 * amax / scheme.maxq).clamp_min(floor)
        return scale, torch.full_like(scale, scheme.mid)
    # 0 stays inside the range (as GPTQ and compressed-tensors do) so the zero point is always a valid code
    lo = x.amin(-1, keepdim=True).clamp_max(0) * ratio
    hi = x.amax(-1, keepdim=True).clamp_min(0) * ratio
    scale = ((hi - lo) / scheme.maxq).clamp_min(floor)
    return scale, (-lo / scale).round().clamp(0, scheme.maxq)


def _rtn(x: torch.Tensor, scheme: QuantScheme, ratio: float, scale_dtype: torch.dtype | None,
         floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero) of one clipping ratio, as floats. x: [out, groups, group]."""
    scale, zero = _grid(x, scheme, ratio, floor)
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).float()
    return (x / scale).round_().add_(zero).clamp_(0, scheme.maxq), scale, zero


def _squared_error(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return ((codes - zero) * scale - x).square_().sum(-1, keepdim=True)  # [out, groups, 1]


def quantize(w: torch.Tensor, scheme: QuantScheme, *, scale_dtype: torch.dtype | None = None,
             clip_search: bool = False) -> QuantizedWeight:
    """Round-to-nearest quantization of w [out, in] (any float dtype).

    scale_dtype: round the scales to the dtype a format stores (fp16 for GPTQ, bf16 for the kernels) before the
    codes are chosen, so writing them loses nothing more. clip_search: per group, also try clipping the range to
    CLIP_RATIOS of its extremes and keep the ratio with the least squared error (a grid search in the spirit of
    AWQ's clip search); it lowers int4's relative error by 3-9% and int8's by under 0.5% (scripts/bench_quant.py).
    """
    out, in_ = w.shape
    groups = scheme.groups(in_)
    x = w.detach().float().reshape(out, groups, in_ // groups)  # [out, groups, group]
    floor = torch.finfo(scale_dtype or torch.float32).tiny  # a zero group keeps a representable, non-zero scale
    best = _rtn(x, scheme, 1.0, scale_dtype, floor)
    if clip_search:
        err = _squared_error(x, *best)
        for ratio in CLIP_RATIOS[1:]:
            candidate = _rtn(x, scheme, ratio, scale_dtype, floor)
            candidate_err = _squared_error(x, *candidate)
            better = candidate_err < err
            err = torch.where(better, candidate_err, err)
            best = tuple(torch.where(better, c, b) for c, b in zip(candidate, best))  # type: ignore[assignment]
    codes, scale, zero = best
    return QuantizedWeight(codes.reshape(out, in_).to(torch.uint8), scale.reshape(out, groups).contiguous(),
                           zero.reshape(out, groups).contiguous(), scheme)


def dequantize(q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W = scales * (codes - zeros), computed in float32 on the tensors' device. -> [out, in] in ``dtype``."""
    out, in_ = q.shape
    groups = q.scales.shape[1]
    # one float32 buffer updated in place: half the time of out-of-place ops on a 3584 x 1024 matrix
    w = q.codes.reshape(out, groups, in_ // groups).float()
    w.sub_(q.zeros.unsqueeze(-1)).mul_(q.scales.unsqueeze(-1))
    return w.reshape(out, in_).to(dtype)


def reconstruction_error(w: torch.Tensor, q: QuantizedWeight) -> float:
    """Relative Frobenius error ||W - dequant(q)|| / ||W||."""
    w = w.float()
    return float((dequantize(q) - w).norm() / w.norm().clamp_min(1e-30))


# ================================================================================================ packing


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Plain nibble packing: two 4-bit codes per byte, low nibble first, row-major. uint8 [N, K] -> [N, K/2]."""
    if codes.shape[-1] % 2:
        raise ConfigError(f"int4 packing needs an even input dimension, got {codes.shape[-1]}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles. uint8 [N, K/2] -> [N, K]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


# ================================================================================================ CPU kernels
#
# _convert_weight_to_int4pack_for_cpu(w int32 [N, K] in 0..15, innerKTiles) -> uint8 [N, K/2] (innerKTiles is
# ignored on CPU; values above 15 are not masked). It cuts the rows into blocks of BLOCK_N (64 on AVX512, 32 on
# AVX2 and the default build) and stores each block k-major, [K, nb/2] bytes; byte (k, d) of a full block holds
# row d (low nibble) and row d + BLOCK_N/2 (high nibble) on AVX512 and AVX2, rows 2d and 2d+1 on the default
# build; a short last block (16, 32 or 48 rows) always pairs rows 2d and 2d+1. So the layout depends on the CPU
# capability torch dispatches to (ATEN_CPU_CAPABILITY), and packed bytes must not move between machines.
# The formats in use (GPTQ, compressed-tensors) pair consecutive inputs of one row in a byte, the kernel pairs
# two rows at one input: from them it is a nibble shuffle, not a byte permutation. Within a block the kernel's
# bytes are a plain byte transpose of "rows d and d + BLOCK_N/2 at input k in one byte", so a format of our own
# could store them directly, tagged with the layout, and shuffle only when the tag differs from this machine's.


@dataclass(frozen=True)
class Int4CpuLayout:
    """Row blocking of torch's CPU int4 layout: block height, and whether a full block pairs d with d + block/2."""

    block_n: int
    paired: bool


INT4_CPU_LAYOUTS = {"AVX512": Int4CpuLayout(64, True), "AVX2": Int4CpuLayout(32, True),
                    "DEFAULT": Int4CpuLayout(32, False)}


def _layout_reference(plain: torch.Tensor, layout: Int4CpuLayout) -> torch.Tensor:
    """The layout built with plain torch ops (slow): used to identify torch's converter at start-up."""
    codes = unpack_nibbles(plain)  # [N, K]
    blocks = []
    for r0 in range(0, codes.shape[0], layout.block_n):
        block = codes[r0 : r0 + layout.block_n]
        half = block.shape[0] // 2
        full = block.shape[0] == layout.block_n and layout.paired
        lo, hi = (block[:half], block[half:]) if full else (block[0::2], block[1::2])
        blocks.append((lo | (hi << 4)).t().reshape(-1))  # [K, nb/2]
    return torch.cat(blocks).view(plain.shape)


@functools.cache
def cpu_int4_layout() -> Int4CpuLayout | None:
    """This process's int4 layout, identified by running torch's converter once on a probe; None if unknown."""
    gen = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (208, 32), generator=gen, dtype=torch.int32)  # 3 blocks of 64 + a short one
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    plain = pack_nibbles(probe)
    for layout in INT4_CPU_LAYOUTS.values():
        if torch.equal(_layout_reference(plain, layout), want):
            return layout
    log.warning("torch's CPU int4 layout is not one offload knows (capability %s): int4 packing uses torch's "
                "slow converter", torch.backends.cpu.get_cpu_capability())
    return None


_LOW, _HIGH = np.uint64(0x0F0F0F0F0F0F0F0F), np.uint64(0xF0F0F0F0F0F0F0F0)
_M32, _M16, _M8 = np.uint64(0x00000000FFFFFFFF), np.uint64(0x0000FFFF0000FFFF), np.uint64(0x00FF00FF00FF00FF)
_S32, _S16, _S8, _S4 = np.uint64(32), np.uint64(16), np.uint64(8), np.uint64(4)


@numba.njit(cache=True, inline="always")
def _swap(a, b, shift, mask):  # numba scalars throughout
    t = ((a >> shift) ^ b) & mask
    return a ^ (t << shift), b ^ t


@numba.njit(cache=True, inline="always")
def _swap4(a, b, c, d, e, f, g, h, shift, mask):  # one stage: four independent pair swaps
    a, b = _swap(a, b, shift, mask)
    c, d = _swap(c, d, shift, mask)
    e, f = _swap(e, f, shift, mask)
    g, h = _swap(g, h, shift, mask)
    return a, b, c, d, e, f, g, h


@numba.njit(cache=True, inline="always")
def _transpose8(a0, a1, a2, a3, a4, a5, a6, a7):
    """Transpose an 8x8 byte matrix held in eight uint64 rows (Hacker's Delight 7-3, on bytes)."""
    a0, a4, a1, a5, a2, a6, a3, a7 = _swap4(a0, a4, a1, a5, a2, a6, a3, a7, _S32, _M32)
    a0, a2, a1, a3, a4, a6, a5, a7 = _swap4(a0, a2, a1, a3, a4, a6, a5, a7, _S16, _M16)
    return _swap4(a0, a1, a2, a3, a4, a5, a6, a7, _S8, _M8)


@numba.njit(cache=True, inline="always")
def _even(lo, hi):  # bytes of k = 2j: low nibbles of both rows
    return (lo & _LOW) | ((hi & _LOW) << _S4)


@numba.njit(cache=True, inline="always")
def _odd(lo, hi):  # bytes of k = 2j + 1: high nibbles of both rows
    return ((lo >> _S4) & _LOW) | (hi & _HIGH)


@numba.njit(cache=True, nogil=True)  # nogil: a loader thread can shuffle while the main thread computes
def _shuffle_int4(plain, out, block_n, paired):
    """plain: uint64 [N, K/16] (16 codes of one row per word); out: uint64 [N * K/16] in the kernel's layout.

    Each step reads 8 words of 8 "low" rows and 8 of their "high" partners, merges nibbles into the bytes of 16
    consecutive k, and transposes two 8x8 byte tiles so that 8 consecutive output bytes (8 rows at one k) are one
    store. Single-threaded on purpose: two threads gained < 25% here and would contend with torch's pool.
    """
    n, words = plain.shape
    for r0 in range(0, n, block_n):
        nb = min(block_n, n - r0)
        half = nb // 2
        step, partner = (1, half) if nb == block_n and paired else (2, 1)
        for d0 in range(0, half, 8):
            rl = r0 + d0 * step
            rh = rl + partner
            col = r0 * words + d0 // 8
            for w in range(words):
                l0, l1, l2, l3 = plain[rl, w], plain[rl + step, w], plain[rl + 2 * step, w], plain[rl + 3 * step, w]
                l4, l5 = plain[rl + 4 * step, w], plain[rl + 5 * step, w]
                l6, l7 = plain[rl + 6 * step, w], plain[rl + 7 * step, w]
                h0, h1, h2, h3 = plain[rh, w], plain[rh + step, w], plain[rh + 2 * step, w], plain[rh + 3 * step, w]
                h4, h5 = plain[rh + 4 * step, w], plain[rh + 5 * step, w]
                h6, h7 = plain[rh + 6 * step, w], plain[rh + 7 * step, w]
                e = _transpose8(_even(l0, h0), _even(l1, h1), _even(l2, h2), _even(l3, h3),
                                _even(l4, h4), _even(l5, h5), _even(l6, h6), _even(l7, h7))
                o = _transpose8(_odd(l0, h0), _odd(l1, h1), _odd(l2, h2), _odd(l3, h3),
                                _odd(l4, h4), _odd(l5, h5), _odd(l6, h6), _odd(l7, h7))
                k0 = 16 * w
                for m in range(8):
                    out[col + (k0 + 2 * m) * (half // 8)] = e[m]
                    out[col + (k0 + 2 * m + 1) * (half // 8)] = o[m]


def plain_to_cpu_int4(plain: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain nibble packing -> torch's CPU int4 layout, bit-exact with _convert_weight_to_int4pack_for_cpu.

    plain: uint8 [N, K/2] (N % 16 == 0, K % 16 == 0; compressed-tensors' int4 weight_packed bytes are exactly
    this). About 330 us for a 3584 x 1024 matrix where torch's converter takes 4-7 ms (scripts/bench_quant.py).
    ``out`` (uint8 [N, K/2], contiguous): write there, e.g. straight into a cache slot. A miss should: a fresh
    1.8 MB result is a fresh mmap whose first-touch page faults cost more than the shuffle, plus a copy.
    """
    n, half_k = plain.shape
    if plain.device.type != "cpu" or plain.dtype != torch.uint8:
        raise ValueError(f"plain_to_cpu_int4 takes a uint8 CPU tensor, got {plain.dtype} on {plain.device}")
    if n % 16 or half_k % 8:
        raise ConfigError(f"the CPU int4 layout needs rows % 16 == 0 and inputs % 16 == 0, got [{n}, {2 * half_k}]")
    if out is not None and (out.shape != plain.shape or out.dtype != torch.uint8 or not out.is_contiguous()):
        raise ValueError(f"plain_to_cpu_int4: out must be a contiguous uint8 {list(plain.shape)}, got "
                         f"{out.dtype} {list(out.shape)}")
    layout = cpu_int4_layout()
    if layout is None:
        codes = unpack_nibbles(plain).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        return packed if out is None else out.copy_(packed)
    if out is None:
        out = torch.empty((n, half_k), dtype=torch.uint8)
    words = plain.reshape(-1).view(torch.int64).view(n, -1).numpy().view(np.uint64)  # [N, K/16]
    _shuffle_int4(words, out.reshape(-1).view(torch.int64).numpy().view(np.uint64), layout.block_n, layout.paired)
    return out


def int4_kernel_group(out_features: int, in_features: int, group_size: int | None) -> int | None:
    """The group the CPU int4 kernel would run a matrix with, or None when the kernel cannot run it.

    The kernel needs N (out) % 16 == 0 and a group G in 32/64/128/256 dividing K (in). A checkpoint group that
    is a multiple of G (or a whole row) runs exactly by repeating each scale over its G-sized sub-groups.
    """
    group = group_size or in_features
    if out_features % 16 or in_features % group:
        return None
    return next((g for g in INT4_KERNEL_GROUPS if group % g == 0), None)


def int8_kernel_ok(in_features: int, scheme: QuantScheme) -> bool:
    """Whether _weight_int8pack_mm can run a matrix: per-channel symmetric int8 and K % 16 == 0.

    K % 16 is not checked by torch: on AVX512 other K return NaN or crash the process (K % 8 on AVX2).
    """
    return scheme.bits == 8 and scheme.symmetric and scheme.group_size in (None, in_features) and in_features % 16 == 0


def kernel_for(out_features: int, in_features: int, scheme: QuantScheme) -> str | None:
    """Which torch CPU kernel runs the matrix ("int4" or "int8"); None: the runtime must use dequant_linear."""
    if scheme.bits == 4:
        return "int4" if int4_kernel_group(out_features, in_features, scheme.group_size) else None
    return "int8" if int8_kernel_ok(in_features, scheme) else None


def int4_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                          kernel_group: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Our (scale, zero) per group -> tinygemm's bf16 [K/G, N, 2], where the kernel computes (q - 8) * s + z.

    s * (q - zero) = s * (q - 8) + s * (8 - zero), so z = s * (8 - zero); a checkpoint group spanning several
    kernel groups repeats its pair. scales, zeros: float32 [N, K/group_size]; ``out``: bf16 [K/G, N, 2] to fill.
    """
    n, groups = scales.shape
    if out is None:
        out = torch.empty((groups * (group_size // kernel_group), n, 2), dtype=torch.bfloat16)
    cells = out.view(groups, group_size // kernel_group, n, 2)  # a checkpoint group's kernel groups side by side
    cells[..., 0] = scales.t()[:, None]
    cells[..., 1] = (scales * (8 - zeros)).t()[:, None]
    return out


def int4_kernel_pack(q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (packed uint8 [N, K/2] in the CPU layout, scales_and_zeros bf16 [K/G, N, 2]).

    The kernel group G is int4_kernel_group(N, K, q.scheme.group_size), also K // scales_and_zeros.shape[0].
    """
    n, k = q.shape
    group = int4_kernel_group(n, k, q.scheme.group_size) if q.scheme.bits == 4 else None
    if group is None:
        raise ConfigError(f"the CPU int4 kernel cannot run a [{n}, {k}] {q.scheme} matrix",
                          "it needs int4, out % 16 == 0 and a group that is a multiple of 32: use dequant_linear")
    sz = int4_scales_and_zeros(q.scales, q.zeros, q.group_size, group)
    return plain_to_cpu_int4(pack_nibbles(q.codes)), sz


def int8_kernel_pack(q: QuantizedWeight, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (w int8 [N, K] = codes - 128, scales bf16 [N]) for _weight_int8pack_mm.

    ``out`` (int8 [N, K], contiguous, CPU): write w there, e.g. straight into a cache slot, with one numpy pass
    (single-threaded: on the loader thread a torch op would start a second OpenMP team beside the compute's).
    """
    n, k = q.shape
    if not int8_kernel_ok(k, q.scheme) or not bool((q.zeros == q.scheme.mid).all()):
        raise ConfigError(f"the CPU int8 kernel cannot run a [{n}, {k}] {q.scheme} matrix",
                          "it needs per-channel symmetric int8 and in % 16 == 0: use dequant_linear")
    scales = q.scales[:, 0].to(torch.bfloat16).contiguous()
    if out is None:
        return (q.codes ^ 0x80).view(torch.int8), scales
    if out.shape != q.codes.shape or out.dtype != torch.int8 or not out.is_contiguous():
        raise ValueError(f"int8_kernel_pack: out must be a contiguous int8 {list(q.codes.shape)}, got "
                         f"{out.dtype} {list(out.shape)}")
    np.bitwise_xor(q.codes.contiguous().numpy(), np.uint8(0x80), out=out.view(torch.uint8).numpy())
    return out, scales


def _as_bf16_2d(x: torch.Tensor) -> torch.Tensor:
    # bf16 activations: with float32 ones the same kernels run 10-15x slower (shared/NOTES.md), with float16 ones
    # 40-80x slower here (8-16 ms for a 3584 x 1024 int4 matrix against 0.1 ms); bf16 is the only fast path
    return x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()


def int4_linear(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [..., in] (any float dtype) @ W.T with W in the CPU int4 layout -> [..., out] in x.dtype (bf16 inside)."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(_as_bf16_2d(x), packed, group, scales_and_zeros)
    return y.to(x.dtype).reshape(*x.shape[:-1], packed.shape[0])


def int8_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] (any float dtype) @ W.T with W = w int8 [out, in] * scales [out] -> [..., out] in x.dtype."""
    y = torch.ops.aten._weight_int8pack_mm(_as_bf16_2d(x), w, scales)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def dequant_linear(x: torch.Tensor, q: QuantizedWeight) -> torch.Tensor:
    """The portable path (any device, any shape): dequantize to x.dtype, then F.linear. x: [..., in] -> [..., out]."""
    return F.linear(x, dequantize(q, x.dtype))


# ================================================================================================ words
#
# Both formats pack codes into int32 words low bits first (4-bit: 8 per word, 8-bit: 4). On a little-endian host
# a word's bytes are then its codes in order, so a byte view is the plain packing: no shifts needed.


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise UnsupportedModelError("quantized checkpoints are read with byte views that assume a little-endian host")


def _unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, W] -> uint8 codes [R, W * 32/bits], low bits of each word first."""
    _require_little_endian()
    b = words.contiguous().view(torch.uint8)  # [R, 4W]
    return unpack_nibbles(b) if bits == 4 else b


def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [R, C] -> int32 [R, ceil(C * bits / 32)], zero-padded at the end of each row."""
    _require_little_endian()
    per_word = 32 // bits
    pad = -codes.shape[1] % per_word
    codes = F.pad(codes.to(torch.uint8), (0, pad))
    b = pack_nibbles(codes) if bits == 4 else codes
    return b.reshape(-1).view(torch.int32).view(b.shape[0], -1)  # flat first: a [1, C] row may have any stride


def _expect(t: torch.Tensor, name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], what: str) -> None:
    """A one-line CheckpointError naming the tensor when its shape or dtype is not what the format needs."""
    hint = "the tensors do not match the checkpoint's quantization_config"
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)} for {what}", hint)
    if t.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise CheckpointError(f"tensor {name!r} is {str(t.dtype).removeprefix('torch.')}, expected {want} for {what}",
                              hint)


def _check_bits(bits: int, fmt: str) -> None:
    if bits not in (4, 8):
        raise UnsupportedModelError(f"{fmt} checkpoints with {bits}-bit weights are not supported",
                                    "offload reads 4- and 8-bit quantized weights")


# ================================================================================================ GPTQ
#
# AutoGPTQ / GPTQModel checkpoint_format "gptq" (v1): qweight int32 [in*bits/32, out] packs consecutive input
# rows into one word; qzeros int32 [groups, out*bits/32] packs consecutive output columns and stores zero - 1
# (AutoGPTQ's pack does zeros -= 1, its dequantization adds 1 back and masks, so zero 0 survives as 2^bits - 1);
# scales fp16 [groups, out]; g_idx int32 [in] (i // group without act-order). W[o, i] = s * (q[i, o] - zero).


def gptq_plain(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight [in*bits/32, out] -> the plain packing [out, in*bits/8] (nibbles for 4-bit, codes for 8-bit).

    A word-level transpose is all it takes, since a word holds consecutive inputs of one output: ~190 us for a
    3584 x 1024 matrix, so GPTQ -> CPU int4 layout is this plus plain_to_cpu_int4.
    """
    _require_little_endian()
    return qweight.t().contiguous().view(torch.uint8)


def _gptq_groups(in_features: int, group_size: int) -> int:
    group = in_features if group_size in (-1, None, 0) else group_size
    if group < 1 or in_features % group:
        raise CheckpointError(f"GPTQ group_size {group_size} does not divide the input dimension {in_features}",
                              "the tensors do not match the checkpoint's quantization_config")
    return in_features // group


def gptq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                bits: int, group_size: int, *, name: str = "weight",
                shape: tuple[int, int] | None = None) -> QuantizedWeight:
    """A GPTQ v1 linear layer -> QuantizedWeight. name: the layer's prefix, for errors; shape: (out, in) expected.

    group_size -1 means one group per row. Act-order (a g_idx that is not i // group) raises: supporting it
    would need the runtime to permute activations (sort inputs by g_idx, keep the permutation).
    """
    _check_bits(bits, "GPTQ")
    per_word = 32 // bits
    if shape is None:
        shape = (qweight.shape[-1], qweight.shape[0] * per_word)
    out, in_ = shape
    groups = _gptq_groups(in_, group_size)
    what = f"a {bits}-bit GPTQ [{out}, {in_}] layer with {groups} group(s)"
    _expect(qweight, f"{name}.qweight", (in_ // per_word, out), (torch.int32,), what)
    _expect(qzeros, f"{name}.qzeros", (groups, -(-out // per_word)), (torch.int32,), what)
    _expect(scales, f"{name}.scales", (groups, out), (torch.float16, torch.bfloat16, torch.float32), what)
    if g_idx is not None:
        _expect(g_idx, f"{name}.g_idx", (in_,), (torch.int32, torch.int64), what)
        if not torch.equal(g_idx.long(), torch.arange(in_, device=g_idx.device) // (in_ // groups)):
            raise UnsupportedModelError(f"tensor {name + '.g_idx'!r} is act-order (desc_act) GPTQ",
                                        "offload reads GPTQ checkpoints quantized with desc_act false")
    scheme = QuantScheme(bits, None if groups == 1 else in_ // groups, True)
    codes = _unpack_words(qweight.t(), bits)  # [out, in]
    zeros = ((_unpack_words(qzeros, bits)[:, :out].int() + 1) & scheme.maxq).t().float()  # [out, groups]
    symmetric = bool((zeros == scheme.mid).all())
    scheme = QuantScheme(bits, scheme.group_size, symmetric)
    return QuantizedWeight(codes, scales.t().float().contiguous(), zeros.contiguous(), scheme)


def gptq_scales_zeros(qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
                      out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Only a GPTQ layer's scales and zero points, float32 [out, groups] each (no codes unpacked)."""
    maxq = (1 << bits) - 1
    zeros = ((_unpack_words(qzeros, bits)[:, :out_features].int() + 1) & maxq).t().float()
    return scales.t().float().contiguous(), zeros.contiguous()


def gptq_pack(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """QuantizedWeight -> {qweight, qzeros, scales (fp16), g_idx} as AutoGPTQ writes them (v1, desc_act false)."""
    in_, groups = q.shape[1], q.scales.shape[1]
    if in_ % (32 // q.scheme.bits):
        raise ConfigError(f"GPTQ packs {32 // q.scheme.bits} inputs per word: input dimension {in_} does not divide")
    stored_zeros = (q.zeros.to(torch.int32) - 1) & q.scheme.maxq  # zero - 1, masked to its field (see above)
    return {
        "qweight": _pack_words(q.codes, q.scheme.bits).t().contiguous(),  # [in*bits/32, out]
        "qzeros": _pack_words(stored_zeros.t().to(torch.uint8), q.scheme.bits),  # [groups, out*bits/32]
        "scales": q.scales.t().to(torch.float16).contiguous(),  # [groups, out]
        "g_idx": (torch.arange(in_, device=q.codes.device) // (in_ // groups)).to(torch.int32),
    }


def gptq_scheme(quantization_config: dict) -> QuantScheme:
    """The scheme of a GPTQ quantization_config; raises on what gptq_unpack cannot read."""
    qc = quantization_config
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt != "gptq":
        raise UnsupportedModelError(f"GPTQ checkpoint_format {fmt!r} is not supported", "offload reads GPTQ v1 (gptq)")
    if qc.get("desc_act"):
        raise UnsupportedModelError("GPTQ with desc_act (act-order) is not supported",
                                    "use a checkpoint quantized with desc_act false")
    bits = int(qc.get("bits", 4))
    _check_bits(bits, "GPTQ")
    group = qc.get("group_size", 128)
    return QuantScheme(bits, None if group in (-1, None) else int(group), bool(qc.get("sym", True)))


# ================================================================================================ compressed-tensors
#
# pack-quantized (llm-compressor): weight_packed int32 [out, ceil(in*bits/32)] holds signed codes + 2^(bits-1),
# low bits first, so on a little-endian host its bytes are the plain packing; weight_scale [out, groups] (one
# group per row for strategy "channel"); weight_shape int [2] = (out, in); asymmetric only: weight_zero_point
# int32 [ceil(out*bits/32), groups], the signed zero point + 2^(bits-1) packed along the output dimension.
# W = scale * (q_signed - zp_signed) = scale * (code - zero) with both in unsigned code space.


def compressed_tensors_unpack(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_shape: torch.Tensor,
                              weight_zero_point: torch.Tensor | None = None, *, bits: int,
                              group_size: int | None, symmetric: bool, name: str = "") -> QuantizedWeight:
    """A compressed-tensors pack-quantized layer -> QuantizedWeight. group_size None: strategy "channel"."""
    _check_bits(bits, "compressed-tensors")
    per_word = 32 // bits
    prefix = f"{name}." if name else ""
    _expect(weight_shape, f"{prefix}weight_shape", (2,), (torch.int32, torch.int64), "a 2-D weight's shape")
    out, in_ = (int(v) for v in weight_shape.tolist())
    scheme = QuantScheme(bits, group_size, symmetric)
    try:
        groups = scheme.groups(in_)
    except ConfigError:
        raise CheckpointError(f"group_size {group_size} does not divide {prefix}weight_shape's input dimension {in_}",
                              "the tensors do not match the checkpoint's quantization_config") from None
    what = f"a {bits}-bit pack-quantized [{out}, {in_}] layer with {groups} group(s)"
    _expect(weight_packed, f"{prefix}weight_packed", (out, -(-in_ // per_word)), (torch.int32,), what)
    _expect(weight_scale, f"{prefix}weight_scale", (out, groups), (torch.bfloat16, torch.float16, torch.float32), what)
    codes = _unpack_words(weight_packed, bits)[:, :in_].contiguous()
    if symmetric:
        zeros = torch.full((out, groups), float(scheme.mid), device=weight_packed.device)
    else:
        if weight_zero_point is None:
            raise CheckpointError(f"tensor {prefix + 'weight_zero_point'!r} is missing from an asymmetric layer",
                                  "the tensors do not match the checkpoint's quantization_config")
        _expect(weight_zero_point, f"{prefix}weight_zero_point", (-(-out // per_word), groups), (torch.int32,), what)
        zeros = _unpack_words(weight_zero_point.t(), bits)[:, :out].t().float().contiguous()  # [out, groups]
    return QuantizedWeight(codes, weight_scale.float().contiguous(), zeros, scheme)


def compressed_tensors_scales_zeros(weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None, bits: int,
                                    out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Only a pack-quantized layer's scales and zero points, float32 [out, groups] each (no codes unpacked)."""
    scales = weight_scale.float().contiguous()
    if weight_zero_point is None:  # symmetric
        return scales, torch.full_like(scales, float(1 << (bits - 1)))
    return scales, _unpack_words(weight_zero_point.t(), bits)[:, :out_features].t().float().contiguous()


def compressed_tensors_pack(q: QuantizedWeight, scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """QuantizedWeight -> {weight_packed, weight_scale, weight_shape[, weight_zero_point]} as llm-compressor writes."""
    out, in_ = q.shape
    tensors = {
        "weight_packed": _pack_words(q.codes, q.scheme.bits),  # [out, ceil(in*bits/32)]
        "weight_scale": q.scales.to(scale_dtype).contiguous(),  # [out, groups]
        "weight_shape": torch.tensor([out, in_], dtype=torch.int64),
    }
    if not q.scheme.symmetric:
        zeros = q.zeros.t().to(torch.uint8)  # [groups, out]
        tensors["weight_zero_point"] = _pack_words(zeros, q.scheme.bits).t().contiguous()  # [ceil(out*bits/32), groups]
    elif not bool((q.zeros == q.scheme.mid).all()):
        raise ConfigError(f"a symmetric {q.scheme} matrix must have every zero point at {q.scheme.mid}")
    return tensors


def compressed_tensors_config(scheme: QuantScheme, ignore: list[str], targets: tuple[str, ...] = ("Linear",)) -> dict:
    """The quantization_config block of a pack-quantized checkpoint (as in Kimi-K2's config.json)."""
    weights = {
        "actorder": None, "block_structure": None, "dynamic": False,
        "group_size": scheme.group_size, "num_bits": scheme.bits, "observer": "minmax", "observer_kwargs": {},
        "strategy": "channel" if scheme.group_size is None else "group", "symmetric": scheme.symmetric,
        "type": "int",
    }
    group = {"input_activations": None, "output_activations": None, "targets": list(targets), "weights": weights}
    return {"config_groups": {"group_0": group}, "format": "pack-quantized", "ignore": list(ignore),
            "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}


def compressed_tensors_scheme(quantization_config: dict) -> QuantScheme:
    """The scheme of a compressed-tensors quantization_config; raises on what compressed_tensors_unpack cannot read."""
    qc = quantization_config
    hint = "offload reads pack-quantized int4/int8 weight-only checkpoints with one config group"
    if qc.get("format") != "pack-quantized":
        raise UnsupportedModelError(f"compressed-tensors format {qc.get('format')!r} is not supported", hint)
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1 or not isinstance(groups[0].get("weights"), dict):
        raise UnsupportedModelError(f"compressed-tensors config with {len(groups)} config groups", hint)
    w = groups[0]["weights"]
    if groups[0].get("input_activations") or w.get("type") != "int" or w.get("strategy") not in ("group", "channel"):
        raise UnsupportedModelError(f"compressed-tensors weights {w.get('type')}/{w.get('strategy')} with "
                                    f"activations {groups[0].get('input_activations')}", hint)
    if w.get("actorder") == "group":
        raise UnsupportedModelError("compressed-tensors with actorder 'group' (weight_g_idx) is not supported", hint)
    bits = int(w["num_bits"])
    _check_bits(bits, "compressed-tensors")
    if w.get("strategy") == "group" and not w.get("group_size"):
        raise UnsupportedModelError("compressed-tensors strategy 'group' without a group_size", hint)
    group = None if w.get("strategy") == "channel" else int(w["group_size"])
    return QuantScheme(bits, group, bool(w.get("symmetric", True)))


def compressed_tensors_ignored(module: str, ignore: list[str]) -> bool:
    """Whether a module name is in a compressed-tensors ``ignore`` list (exact names, or "re:" + regex)."""
    return any(re.match(p[3:], module) if p.startswith("re:") else p == module for p in ignore)


def scheme_from_config(quantization_config: dict) -> tuple[str, QuantScheme]:
    """(quant_method, scheme) of a checkpoint's quantization_config; UnsupportedModelError for other formats."""
    method = str(quantization_config.get("quant_method", "")).lower()
    if method == "gptq":
        return method, gptq_scheme(quantization_config)
    if method == "compressed-tensors":
        return method, compressed_tensors_scheme(quantization_config)
    raise UnsupportedModelError(f"quantization method {method!r} is not supported",
                                "offload reads GPTQ (v1) and compressed-tensors pack-quantized checkpoints")


# ================================================================================================ bytes


def int4_kernel_nbytes(out_features: int, in_features: int, kernel_group: int) -> int:
    """Bytes of a matrix in the CPU int4 layout: nibbles + bf16 (scale, zero) per kernel group and row."""
    return out_features * in_features // 2 + (in_features // kernel_group) * out_features * 2 * 2


def int8_kernel_nbytes(out_features: int, in_features: int) -> int:
    """Bytes of a matrix for the CPU int8 kernel: one byte per weight + one bf16 scale per row."""
    return out_features * in_features + out_features * 2


def plain_nbytes(out_features: int, in_features: int, scheme: QuantScheme) -> int:
    """Bytes of a portable layout for dequant_linear (proposed, not built here): codes packed as compressed-tensors
    packs them, bf16 scales, and uint8 zero points when asymmetric."""
    groups = scheme.groups(in_features)
    return out_features * in_features * scheme.bits // 8 + out_features * groups * (2 + (0 if scheme.symmetric else 1))


def quantized_nbytes(out_features: int, in_features: int, scheme: QuantScheme) -> int:
    """Bytes a quantized matrix takes where it is resident: the kernel layout if a kernel runs it, else portable."""
    kernel = kernel_for(out_features, in_features, scheme)
    if kernel == "int4":
        group = int4_kernel_group(out_features, in_features, scheme.group_size)
        return int4_kernel_nbytes(out_features, in_features, group)  # type: ignore[arg-type]
    if kernel == "int8":
        return int8_kernel_nbytes(out_features, in_features)
    return plain_nbytes(out_features, in_features, scheme)
