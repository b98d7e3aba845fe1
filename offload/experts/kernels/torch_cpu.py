"""torch's CPU weight-only kernels as the int4/int8 slot layouts use them: ``_weight_int8pack_mm`` (int8,
per-channel symmetric) and ``_weight_int4pack_mm_for_cpu`` (int4, groups of 32..256, tinygemm's
(q - 8) * scale + zero), with a fast converter from plain nibble packing to the int4 kernel's layout, so that a
cache miss costs a shuffle, not a repack.

_convert_weight_to_int4pack_for_cpu(w int32 [N, K] in 0..15, innerKTiles) -> uint8 [N, K/2] (innerKTiles is
ignored on CPU; values above 15 are not masked). It cuts the rows into blocks of BLOCK_N (64 on AVX512, 32 on
AVX2 and the default build) and stores each block k-major, [K, nb/2] bytes; byte (k, d) of a full block holds
row d (low nibble) and row d + BLOCK_N/2 (high nibble) on AVX512 and AVX2, rows 2d and 2d+1 on the default
build; a short last block (16, 32 or 48 rows) always pairs rows 2d and 2d+1. So the layout depends on the CPU
capability torch dispatches to (ATEN_CPU_CAPABILITY), and packed bytes must not move between machines.
The formats in use (GPTQ, compressed-tensors) pair consecutive inputs of one row in a byte, the kernel pairs
two rows at one input: from them it is a nibble shuffle, not a byte permutation.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F

from offload.errors import ConfigError
from offload.experts.quant import (
    INT4_GROUPS,
    QuantizedWeight,
    QuantScheme,
    dequantize,
    pack_nibbles,
    unpack_nibbles,
)

log = logging.getLogger(__name__)


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
    return next((g for g in INT4_GROUPS if group % g == 0), None)


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
