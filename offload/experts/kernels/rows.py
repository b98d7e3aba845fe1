"""The row kernels: y[t, r] for rows r in [lo, hi) of one weight matrix and every token t, from the bytes as stored.

A matrix-vector product at decode reads each weight byte once, so memory bandwidth is the ceiling: the kernels
loop rows outermost and tokens inside (a row's bytes stay in L1 for the other tokens) and the pool (pool.py)
splits rows between threads. The inner loops are plain integer or float loops that LLVM vectorizes for the host
CPU (numba compiles for it): on this EPYC they become 256-bit AVX2 code (``vpmaddwd`` for the integer dots,
``vfmadd231ps`` for floats), on an ARM machine NEON, on an old x86 SSE2; the integer sums are exact on all of them,
only the float accumulation order differs. ``NUMBA_CPU_NAME=generic`` compiles the portable baseline, which the
tests compare against the host build.

Formats (bytes per row exactly as a slot holds them, which is how the checkpoint stores them):
- float: ``w`` uint16 (bf16 bits, or IEEE half bits when ``half``) or float32 [N, K]; activations float32 [T, K].
- int4: ``w`` uint8 [N, K/2], plain nibble packing (byte j: input 2j in the low nibble, 2j + 1 in the high one;
  compressed-tensors' ``weight_packed`` bytes), codes 0..15. int8: ``w`` int8 [N, K].
  Per weight group of ``gw`` inputs a float32 scale ``s`` [N, K/gw] and ``m`` = scale * zero point [N, K/gw], so
  W = s * q - m. Activations are quantized per block of ``ga`` inputs (ga divides gw): int8 or int16 codes, their
  scale ``xs`` [T, K/ga] and ``xz`` = xs * (sum of the block's codes) [T, K/ga]; then
  y = sum over blocks of s * xs * dot(q, x codes) - m * xz. int4 takes its activations split into even and odd
  inputs (``xe``, ``xo`` [T, K/2]) so that a byte's two nibbles meet their inputs at the same index.

Measured on the 2-core EPYC, one thread, 3584x1024 matrices streamed from RAM: int8 13-14 GB/s, int4 7.2 GB/s of
codes, bf16 15.5 GB/s, f32 19-20 GB/s (scripts/bench_kernels.py, docs/performance.md#cpu-kernels).
"""

from __future__ import annotations

import warnings

import numba
import numpy as np
from numba import njit
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import overload

from offload.experts.kernels import intrinsics

# numba's pedantic SSA check flags the accumulators of the block dots it inlines below (inline="always", which the
# kernels need: a called dot with a runtime trip count ran 3-4x slower); the compiled code is right (the kernel tests
# check every format against tests/reference.py), so the check's warning is not shown to users at first compile.
warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning)

CHUNK = 64  # bytes: a compile-time inner trip count LLVM vectorizes cleanly (runtime-length block loops ran 1.3-2x
#             slower here, a constant 16 fell back to scalar code); blocks that are not a multiple use _int4_dot's loop


@njit(inline="always")
def _int4_dot(w, xe, xo, r, t, start, count):
    d = 0
    base = np.uint64(start)  # unsigned: no negative-index wraparound test, so LLVM vectorizes
    for j in range(count):
        i = base + np.uint64(j)
        q = w[r, i]
        d += np.int32(q & np.uint8(15)) * np.int32(xe[t, i]) + np.int32(q >> np.uint8(4)) * np.int32(xo[t, i])
    return d


@njit(inline="always")
def _int8_dot(w, x, r, t, start, count):
    d = 0
    base = np.uint64(start)
    for j in range(count):
        i = base + np.uint64(j)
        d += np.int32(w[r, i]) * np.int32(x[t, i])
    return d


def block_dot(w, x, xo, r, t, start, count):
    """Integer dot of row r's bytes start..start+count with token t's activation codes (int4 or int8 weights)."""


@overload(block_dot, inline="always")
def _block_dot(w, x, xo, r, t, start, count):
    if w.dtype == numba.uint8:  # int4 nibbles: x holds the even inputs, xo the odd ones
        return lambda w, x, xo, r, t, start, count: _int4_dot(w, x, xo, r, t, start, count)
    return lambda w, x, xo, r, t, start, count: _int8_dot(w, x, r, t, start, count)


@njit(cache=True, nogil=True, fastmath=True)
def int_rows(w, s, m, x, xo, xs, xz, y, lo, hi):
    """Integer weights times quantized activations; rows lo..hi of y [T, N]. int4: ``w`` uint8 nibbles [N, K/2] with
    ``x`` / ``xo`` the even / odd inputs [T, K/2]; int8: ``w`` int8 [N, K] with ``x`` [T, K] (``xo`` unused)."""
    tokens = x.shape[0]
    groups, blocks = s.shape[1], xs.shape[1]
    block = x.shape[1] // blocks  # bytes of w per activation block
    per_group = blocks // groups
    for r in range(lo, hi):
        for t in range(tokens):
            acc = np.float32(0.0)
            b = 0
            for g in range(groups):
                for _ in range(per_group):
                    d = 0
                    if block % CHUNK == 0:
                        for c in range(block // CHUNK):
                            d += block_dot(w, x, xo, r, t, b * block + c * CHUNK, CHUNK)
                    else:
                        d = block_dot(w, x, xo, r, t, b * block, block)
                    # int32 (exact: |d| < 2^31): the truncation lets LLVM keep the sums in 32-bit lanes
                    acc += s[r, g] * xs[t, b] * np.float32(np.int32(d)) - m[r, g] * xz[t, b]
                    b += 1
            y[t, r] = acc


def widen(bits):
    """A stored float weight -> float32: bf16 bits (uint16), or a float32 as it is."""


@overload(widen, inline="always")
def _widen(bits):
    if bits == numba.float32:
        return lambda bits: bits
    return lambda bits: intrinsics.bf16_to_f32(bits)


def widen_half(bits):
    """IEEE half bits (uint16) -> float32 (a float32 passes: float_rows compiles, never runs, it for float32)."""


@overload(widen_half, inline="always")
def _widen_half(bits):
    if bits == numba.float32:
        return lambda bits: bits
    return lambda bits: intrinsics.f16_to_f32(bits)


@njit(cache=True, nogil=True, fastmath=True)
def float_rows(w, x, y, lo, hi, half):
    """Float weights times float32 activations; rows lo..hi of y [T, N]. ``half``: uint16 ``w`` is IEEE half."""
    tokens, k = x.shape
    for r in range(lo, hi):
        for t in range(tokens):
            acc = np.float32(0.0)
            if half:
                for i in range(k):
                    acc += widen_half(w[r, i]) * x[t, i]
            else:
                for i in range(k):
                    acc += widen(w[r, i]) * x[t, i]
            y[t, r] = acc


@njit(cache=True, nogil=True, fastmath=True)
def quantize_rows(x, block, xe, xo, xs, xz, qmax, split):
    """Symmetric per-block quantization of activations x float32 [T, K] into int8 or int16 codes, with scale
    xs [T, K/block] = absmax / qmax and xz = xs * sum(codes in block) for the weights' zero-point term (llama.cpp's
    Q8 activations; int16 keeps the error near 1e-5 relative). ``split``: even inputs go to xe, odd ones to xo
    (int4's order, [T, K/2] each); else all to xe [T, K]."""
    tokens, k = x.shape
    for t in range(tokens):
        for b in range(k // block):
            amax = np.float32(0.0)
            for i in range(b * block, (b + 1) * block):
                amax = max(amax, abs(x[t, i]))
            scale = amax / qmax
            inv = np.float32(0.0) if scale == 0 else np.float32(1.0) / scale
            total = 0
            for i in range(b * block, (b + 1) * block):
                q = int(np.rint(x[t, i] * inv))
                if not split:
                    xe[t, i] = q
                elif i % 2 == 0:
                    xe[t, i // 2] = q
                else:
                    xo[t, i // 2] = q
                total += q
            xs[t, b] = scale
            xz[t, b] = scale * total
