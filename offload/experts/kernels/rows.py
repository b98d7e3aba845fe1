"""The row kernels: y[t, r] for rows r in [lo, hi) of one weight matrix and every token t, from the bytes as stored.

A matrix-vector product at decode reads each weight byte once, so memory bandwidth is the ceiling: the kernels
loop rows outermost and tokens inside (a row's bytes stay in L1 for the other tokens) and the pool (pool.py)
splits rows between threads. Two implementations, the same sums:
- AVX2 (``int8_activation_rows``, integer weights with int8 activations, where the target has AVX2): llama.cpp's
  ``vpmaddubsw`` dot products on numba vector values (vectors.py), eight blocks reduced at once;
- portable (``int_rows``, ``float_rows``, and int16 activations everywhere): plain integer or float loops that LLVM
  vectorizes for the CPU numba compiles for (``vpmaddwd`` / ``vfmadd231ps`` on AVX2, NEON on ARM, SSE2 on an old
  x86). ``NUMBA_CPU_NAME=generic`` compiles only this one, which the tests compare against the host build.
Integer sums are exact in both; only the float accumulation order differs.

Formats (bytes per row exactly as a slot holds them, which is how the checkpoint stores them):
- float: ``w`` uint16 (bf16 bits, or IEEE half bits when ``half``) or float32 [N, K]; activations float32 [T, K].
- int4: ``w`` uint8 [N, K/2], plain nibble packing (byte j: input 2j in the low nibble, 2j + 1 in the high one;
  compressed-tensors' ``weight_packed`` bytes), codes 0..15. int8: ``w`` int8 [N, K].
  Per weight group of ``gw`` inputs a float32 scale ``s`` [N, K/gw] and ``m`` = scale * zero point [N, K/gw], so
  W = s * q - m. Activations are quantized per block of ``ga`` inputs (ga divides gw): int8 or int16 codes, their
  scale ``xs`` [T, K/ga] and ``xz`` = xs * (sum of the block's codes) [T, K/ga]; then
  y = sum over blocks of s * xs * dot(q, x codes) - m * xz. int4 takes its activations split into even and odd
  inputs (``xe``, ``xo`` [T, K/2]) so that a byte's two nibbles meet their inputs at the same index.

Measured on the 2-core EPYC, 3584x1024 / 1024x3584 matrices streamed from RAM, one token, 2 threads (GB/s of
weights incl. scales; scripts/bench_kernels.py, docs/performance.md#cpu-kernels): bf16 23.5, f32 25.7, int8 11.9,
int4 g128 9.1, int4 g32 15.3 (AVX2 path; the portable loops ran int4 g32 at 3.6).
"""

from __future__ import annotations

import warnings

import numba
import numpy as np
from numba import njit
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import overload

from offload.experts.kernels import cache, intrinsics, vectors
from offload.experts.kernels.vectors import fma, fmul, fzero, iadd, itotal, izero, load8, splat, sums4, sums8, total

# numba's pedantic SSA check flags the accumulators of the block dots it inlines below (inline="always", which the
# kernels need: a called dot with a runtime trip count ran 3-4x slower); the compiled code is right (the kernel tests
# check every format against tests/reference.py), so the check's warning is not shown to users at first compile.
warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning)

PREFETCH = 2048
WHOLE, EVEN_ODD, HALVES = 0, 1, 2  # quantize_rows' splits of the activation codes
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


def store(y, t, r, value):
    """y[t, r] = value: a float32 output as it is, a uint16 one as bf16 bits (rounded to nearest even)."""


@overload(store, inline="always")
def _store(y, t, r, value):
    if y.dtype == numba.uint16:
        def to_bf16(y, t, r, value):
            y[t, r] = intrinsics.f32_to_bf16(np.float32(value))
        return to_bf16

    def as_is(y, t, r, value):
        y[t, r] = value
    return as_is


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
            store(y, t, r, acc)


def unit_dot(w, x, xo, i):
    """Bytes w[i:i+32] of one row times their activation codes, as 8 int32 partial sums (AVX2)."""


@overload(unit_dot, inline="always")
def _unit_dot(w, x, xo, i):
    if w.dtype == numba.uint8:
        return lambda w, x, xo, i: vectors.dot_int4(w, x, xo, i)
    return lambda w, x, xo, i: vectors.dot_int8(w, i, x, i)


@njit(inline="always")
def _block_dot(wr, xt, xot, c, units):
    """One activation block of ``units`` x 32 weight bytes from byte c, as 8 int32 partial sums."""
    d = izero()
    for u in range(units):
        d = iadd(d, unit_dot(wr, xt, xot, c + 32 * u))
    return d


@njit(inline="always")
def _vector_rows(w, s, m, x, xo, xs, xz, y, lo, hi, half, per_block):
    """int_rows on AVX2 vectors, for blocks of 16 bytes (``half``) or 32n bytes with a weight scale per block
    (``per_block``) or per row.

    Eight blocks per step: their dots are reduced together (sums8 / sums4) and scaled by vectors of scales, so a
    block of 32 inputs (llama.cpp's Q8_0 / Q4_0 shape) costs a few shuffles, not a horizontal sum; blocks past the
    last multiple of 8 take one horizontal sum each.
    """
    tokens = x.shape[0]
    blocks = xs.shape[1]
    size = x.shape[1] // blocks  # weight bytes per block
    units = size // 32
    whole = blocks - blocks % 8
    for r in range(lo, hi):
        wr, sr, mr = w[r], s[r], m[r]
        for t in range(tokens):
            xt, xot, xst, xzt = x[t], xo[t], xs[t], xz[t]
            acc, corr = fzero(), fzero()
            for b in range(0, whole, 8):
                if half:  # int4 groups of 32: a 32-byte unit holds two blocks
                    c = b * 16
                    d = sums4(unit_dot(wr, xt, xot, c), unit_dot(wr, xt, xot, c + 32),
                              unit_dot(wr, xt, xot, c + 64), unit_dot(wr, xt, xot, c + 96))
                else:
                    c = b * size
                    d = sums8(_block_dot(wr, xt, xot, c, units), _block_dot(wr, xt, xot, c + size, units),
                              _block_dot(wr, xt, xot, c + 2 * size, units),
                              _block_dot(wr, xt, xot, c + 3 * size, units),
                              _block_dot(wr, xt, xot, c + 4 * size, units),
                              _block_dot(wr, xt, xot, c + 5 * size, units),
                              _block_dot(wr, xt, xot, c + 6 * size, units),
                              _block_dot(wr, xt, xot, c + 7 * size, units))
                if per_block:
                    ws, wm = load8(sr, b), load8(mr, b)
                else:
                    ws, wm = splat(sr[0]), splat(mr[0])
                acc = fma(vectors.to_float(d), fmul(ws, load8(xst, b)), acc)
                corr = fma(wm, load8(xzt, b), corr)
            tail = np.float32(0.0)
            for b in range(whole, blocks):  # size >= 32 here (16-byte blocks come in eights)
                g = b if per_block else 0
                d = itotal(_block_dot(wr, xt, xot, b * size, units))
                tail += sr[g] * xst[b] * np.float32(d) - mr[g] * xzt[b]
            store(y, t, r, total(acc) - total(corr) + tail)


def int8_activation_rows(w, s, m, x, xo, xs, xz, y, lo, hi):
    """int_rows for int8 activation codes: the AVX2 kernels where the target has AVX2 and the blocks fit them."""


@overload(int8_activation_rows)
def _int8_activation_rows(w, s, m, x, xo, xs, xz, y, lo, hi):
    if not vectors.AVX2:
        return lambda w, s, m, x, xo, xs, xz, y, lo, hi: int_rows(w, s, m, x, xo, xs, xz, y, lo, hi)

    def rows_avx2(w, s, m, x, xo, xs, xz, y, lo, hi):
        groups, blocks = s.shape[1], xs.shape[1]
        size = x.shape[1] // blocks  # weight bytes per activation block
        # constant flags: each call site inlines its own copy of the loops with the branches folded away (a
        # runtime flag tested inside the loop ran 3x slower)
        if size == 16 and blocks % 8 == 0 and groups == blocks:
            _vector_rows(w, s, m, x, xo, xs, xz, y, lo, hi, True, True)
        elif size % 32 == 0 and groups == blocks:
            _vector_rows(w, s, m, x, xo, xs, xz, y, lo, hi, False, True)
        elif size % 32 == 0 and groups == 1:
            _vector_rows(w, s, m, x, xo, xs, xz, y, lo, hi, False, False)
        else:
            int_rows(w, s, m, x, xo, xs, xz, y, lo, hi)

    return rows_avx2


# -- ggml's blocks (GGUF files), computed as they lie (ggml-common.h's block_q8_0, block_q4_0, block_q4_K, block_q6_K):
#    Q8_0 [f16 d, 32 x int8], value q x d.
#    Q4_0 [f16 d, 16 bytes of nibbles: element j in the low nibble of byte j, j + 16 in its high one], (q - 8) x d.
#    Q4_K, 256 weights [f16 d, f16 dmin, 12 bytes of eight 6-bit scales and mins, 128 bytes of nibbles: each run of
#      32 bytes holds 64 weights, the first 32 in the low nibbles], sub-block j of 32: d x sc_j x q - dmin x m_j.
#    Q6_K, 256 weights [128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 x int8 scales, f16 d], sub-block j of
#      16: d x sc_j x (q - 32); the bits of weights 0..127 (and again 128..255): low nibbles of ql[0:64] for 0..63,
#      high nibbles for 64..127, the 2-bit pairs of qh[0:32] at shifts 0, 2, 4, 6 for 0..31, 32..63, 64..95, 96..127.
#    MXFP4 [E8M0 exponent e, 16 bytes of E2M1 codes in Q4_0's nibble order], value MXFP4_VALUES[q] x 2^(e - 128).
Q8_0, Q4_0, Q4_K, Q6_K, MXFP4 = range(5)  # the block kinds the kernels take
Q8_0_BYTES, Q4_0_BYTES, Q4_K_BYTES, Q6_K_BYTES, MXFP4_BYTES = 34, 18, 144, 210, 17
BLOCK_BYTES = (Q8_0_BYTES, Q4_0_BYTES, Q4_K_BYTES, Q6_K_BYTES, MXFP4_BYTES)
BLOCK_WEIGHTS = (32, 32, 256, 256, 32)
MXFP4_VALUES = vectors.MXFP4_VALUES


@njit(inline="always")
def _block_scale(wr, at):
    """The f16 scale at byte ``at`` of a block row (little-endian), as float32."""
    return widen_half(np.uint16(wr[at]) | (np.uint16(wr[at + 1]) << np.uint16(8)))


@njit(inline="always")
def _q8_0_block(wr, b, xt, scale):
    """Block b of a Q8_0 row against its activation codes xt [K] (scale: theirs): d x scale x dot."""
    at = b * Q8_0_BYTES
    d = 0
    for j in range(32):
        d += np.int32(np.int8(wr[at + 2 + j])) * np.int32(xt[b * 32 + j])
    return _block_scale(wr, at) * scale * np.float32(np.int32(d))


@njit(inline="always")
def _nibble_value(q, mx):
    """A 4-bit code as the integer it stands for: MXFP4's doubled E2M1 value when ``mx``, else the code."""
    return np.int32(MXFP4_VALUES[q]) if mx else np.int32(q)


@njit(inline="always")
def _halves_block(wr, b, xlt, xht, scale, zero, mx):
    """Block b of a Q4_0 row (or MXFP4 when ``mx``) against its codes split in halves (xlt / xht [K/2]):
    d x (scale x dot - 8 x zero) for Q4_0, 2^(e - 128) x scale x dot for MXFP4."""
    size = MXFP4_BYTES if mx else Q4_0_BYTES
    at = b * size
    first = at + (1 if mx else 2)
    d = 0
    for j in range(16):
        q = wr[first + j]
        d += (_nibble_value(q & np.uint8(15), mx) * np.int32(xlt[b * 16 + j])
              + _nibble_value(q >> np.uint8(4), mx) * np.int32(xht[b * 16 + j]))
    if mx:
        return intrinsics.e8m0_half(wr[at]) * scale * np.float32(np.int32(d))
    return _block_scale(wr, at) * (scale * np.float32(np.int32(d)) - 8 * zero)


@njit(inline="always")
def _k4_scale_min(wr, at, j):
    """Sub-block j's 6-bit scale and min in the Q4_K block at ``at`` (ggml's get_scale_min_k4)."""
    q = at + 4
    if j < 4:
        return np.int32(wr[q + j]) & 63, np.int32(wr[q + j + 4]) & 63
    both, first, second = np.int32(wr[q + j + 4]), np.int32(wr[q + j - 4]), np.int32(wr[q + j])
    return (both & 15) | ((first >> 6) << 4), (both >> 4) | ((second >> 6) << 4)


@njit(inline="always")
def _q4_k_code(wr, at, i):
    """Weight i (0..255) of the Q4_K block at ``at``: its 4-bit code."""
    byte = np.int32(wr[at + 16 + i // 64 * 32 + i % 32])
    return byte >> 4 if i % 64 >= 32 else byte & 15


@njit(inline="always")
def _q6_k_code(wr, at, i):
    """Weight i (0..255) of the Q6_K block at ``at``: its code minus 32 (-32..31)."""
    half, group, lane = i // 128, i % 128 // 32, i % 32
    low = np.int32(wr[at + 64 * half + lane + 32 * (group % 2)])
    low = low >> 4 if group >= 2 else low & 15
    two = (np.int32(wr[at + 128 + 32 * half + lane]) >> np.int32(2 * group)) & 3
    return (low | (two << 4)) - 32


@njit(inline="always")
def _q4_k_block(wr, sb, xt, xst, xzt):
    """Super-block sb of a Q4_K row against int8 codes xt [K] with a scale per 32 (xst, xzt as for int4)."""
    at = sb * Q4_K_BYTES
    d, dmin = _block_scale(wr, at), _block_scale(wr, at + 2)
    acc = np.float32(0.0)
    for j in range(8):
        sc, mn = _k4_scale_min(wr, at, j)
        dot = 0
        for i in range(32):
            dot += _q4_k_code(wr, at, 32 * j + i) * np.int32(xt[256 * sb + 32 * j + i])
        b = 8 * sb + j
        acc += d * np.float32(sc) * xst[b] * np.float32(np.int32(dot)) - dmin * np.float32(mn) * xzt[b]
    return acc


@njit(inline="always")
def _q6_k_block(wr, sb, xt, xst):
    """Super-block sb of a Q6_K row against int8 codes xt [K] with a scale per 32 (xst)."""
    at = sb * Q6_K_BYTES
    d = _block_scale(wr, at + 208)
    acc = np.float32(0.0)
    for j in range(16):
        dot = 0
        for i in range(16):
            dot += _q6_k_code(wr, at, 16 * j + i) * np.int32(xt[256 * sb + 16 * j + i])
        acc += d * np.float32(np.int8(wr[at + 192 + j])) * xst[8 * sb + j // 2] * np.float32(np.int32(dot))
    return acc


@njit(cache=True, nogil=True, fastmath=True)
def ggml_portable(w, x, xo, xs, xz, y, lo, hi, kind):
    """Rows of ggml blocks (``kind``: Q8_0, Q4_0, Q4_K, Q6_K, MXFP4) times int8 activation codes with a scale per 32
    inputs (xs [T, K/32], xz = xs x the block's code sum): x [T, K] in order (WHOLE), except Q4_0's and MXFP4's split
    into each block's halves (x / xo [T, K/2], HALVES). y = sum over blocks of the weight scale x xs x dot, less the
    mins' term."""
    tokens = x.shape[0]
    blocks = xs.shape[1] * 32 // BLOCK_WEIGHTS[kind]
    for r in range(lo, hi):
        wr = w[r]
        for t in range(tokens):
            acc = np.float32(0.0)
            for b in range(blocks):
                if kind == Q4_0 or kind == MXFP4:
                    acc += _halves_block(wr, b, x[t], xo[t], xs[t, b], xz[t, b], kind == MXFP4)
                elif kind == Q8_0:
                    acc += _q8_0_block(wr, b, x[t], xs[t, b])
                elif kind == Q4_K:
                    acc += _q4_k_block(wr, b, x[t], xs[t], xz[t])
                else:
                    acc += _q6_k_block(wr, b, x[t], xs[t])
            store(y, t, r, acc)


@njit(inline="always")
def _scale(wr, at, mx):
    """A block's scale at byte ``at``: MXFP4's E8M0 (halved) when ``mx``, else an f16."""
    return intrinsics.e8m0_half(wr[at]) if mx else _block_scale(wr, at)


@njit(inline="always")
def _scales8(wr, at, stride, mx=False):
    return vectors.vec8(_scale(wr, at, mx), _scale(wr, at + stride, mx), _scale(wr, at + 2 * stride, mx),
                        _scale(wr, at + 3 * stride, mx), _scale(wr, at + 4 * stride, mx),
                        _scale(wr, at + 5 * stride, mx), _scale(wr, at + 6 * stride, mx),
                        _scale(wr, at + 7 * stride, mx))


@njit(inline="always")
def _q8_0_vector(w, x, xs, y, lo, hi):
    tokens, blocks = x.shape[0], xs.shape[1]
    whole, s = blocks - blocks % 8, Q8_0_BYTES
    for r in range(lo, hi):
        wr = w[r]
        for t in range(tokens):
            xt, xst = x[t], xs[t]
            acc = fzero()
            for b in range(0, whole, 8):
                at, c = b * s, b * 32
                d = sums8(vectors.dot_int8(wr, at + 2, xt, c), vectors.dot_int8(wr, at + s + 2, xt, c + 32),
                          vectors.dot_int8(wr, at + 2 * s + 2, xt, c + 64),
                          vectors.dot_int8(wr, at + 3 * s + 2, xt, c + 96),
                          vectors.dot_int8(wr, at + 4 * s + 2, xt, c + 128),
                          vectors.dot_int8(wr, at + 5 * s + 2, xt, c + 160),
                          vectors.dot_int8(wr, at + 6 * s + 2, xt, c + 192),
                          vectors.dot_int8(wr, at + 7 * s + 2, xt, c + 224))
                acc = fma(vectors.to_float(d), fmul(_scales8(wr, at, s), load8(xst, b)), acc)
            tail = np.float32(0.0)
            for b in range(whole, blocks):
                tail += _q8_0_block(wr, b, xt, xst[b])
            store(y, t, r, total(acc) + tail)


@njit(inline="always")
def _halves_dot(wr, first, second, xlt, xht, c, mx):
    if mx:
        return vectors.dot_mxfp4(wr, first, second, xlt, xht, c)
    return vectors.dot_q4_0(wr, first, second, xlt, xht, c)


@njit(inline="always")
def _halves_vector(w, xl, xh, xs, xz, y, lo, hi, mx):
    """Q4_0 rows on AVX2 (MXFP4 when ``mx``: its codes looked up as values, no zero point, E8M0 scales)."""
    tokens, blocks = xl.shape[0], xs.shape[1]
    s = MXFP4_BYTES if mx else Q4_0_BYTES
    whole, codes = blocks - blocks % 8, 1 if mx else 2
    for r in range(lo, hi):
        wr = w[r]
        for t in range(tokens):
            xlt, xht, xst, xzt = xl[t], xh[t], xs[t], xz[t]
            acc, corr = fzero(), fzero()
            for b in range(0, whole, 8):
                at, c = b * s + codes, b * 16
                d = sums4(_halves_dot(wr, at, at + s, xlt, xht, c, mx),
                          _halves_dot(wr, at + 2 * s, at + 3 * s, xlt, xht, c + 32, mx),
                          _halves_dot(wr, at + 4 * s, at + 5 * s, xlt, xht, c + 64, mx),
                          _halves_dot(wr, at + 6 * s, at + 7 * s, xlt, xht, c + 96, mx))
                scales = _scales8(wr, at - codes, s, mx)
                acc = fma(vectors.to_float(d), fmul(scales, load8(xst, b)), acc)
                if not mx:
                    corr = fma(scales, load8(xzt, b), corr)
            tail = np.float32(0.0)
            for b in range(whole, blocks):
                tail += _halves_block(wr, b, xlt, xht, xst[b], xzt[b], mx)
            store(y, t, r, total(acc) - 8 * total(corr) + tail)


@njit(inline="always")
def _q4_k_vector(w, x, xs, xz, y, lo, hi):
    """Q4_K rows on AVX2: a super-block's eight sub-block dots reduced at once (sums8), scaled by its factors.
    A row's factors (d x scales, dmin x mins) are decoded once into ``f`` and read back by every token."""
    tokens, supers = x.shape[0], xs.shape[1] // 8
    low, high = vectors.dot_low_nibbles, vectors.dot_high_nibbles
    f = np.empty(16 * supers, np.float32)
    for r in range(lo, hi):
        wr = w[r]
        for sb in range(supers):
            at = sb * Q4_K_BYTES
            vectors.store8(f, 16 * sb, fmul(splat(_block_scale(wr, at)), vectors.k4_scales(wr, at)))
            vectors.store8(f, 16 * sb + 8, fmul(splat(_block_scale(wr, at + 2)), vectors.k4_mins(wr, at)))
        for t in range(tokens):
            xt, xst, xzt = x[t], xs[t], xz[t]
            acc, corr = fzero(), fzero()
            for sb in range(supers):
                c, q = sb * 256, sb * Q4_K_BYTES + 16
                d = sums8(low(wr, q, xt, c), high(wr, q, xt, c + 32), low(wr, q + 32, xt, c + 64),
                          high(wr, q + 32, xt, c + 96), low(wr, q + 64, xt, c + 128),
                          high(wr, q + 64, xt, c + 160), low(wr, q + 96, xt, c + 192),
                          high(wr, q + 96, xt, c + 224))
                acc = fma(vectors.to_float(d), fmul(load8(f, 16 * sb), load8(xst, 8 * sb)), acc)
                corr = fma(load8(f, 16 * sb + 8), load8(xzt, 8 * sb), corr)
            store(y, t, r, total(acc) - total(corr))


@njit(inline="always")
def _q6_k_half(wr, at, h, xt, xst, c, acc):
    """Weights 128h..128h+127 of the Q6_K block at ``at`` (its 8 sub-blocks of 16), added into acc."""
    ql, qh = at + 64 * h, at + 128 + 32 * h
    d = sums4(vectors.dot_q6_k(wr, ql, qh, 0, xt, c), vectors.dot_q6_k(wr, ql + 32, qh, 2, xt, c + 32),
              vectors.dot_q6_k(wr, ql, qh, 4, xt, c + 64), vectors.dot_q6_k(wr, ql + 32, qh, 6, xt, c + 96))
    scales = fmul(splat(_block_scale(wr, at + 208)), vectors.load8_int8(wr, at + 192 + 8 * h))
    return fma(vectors.to_float(d), fmul(scales, vectors.load4_pairs(xst, c // 32)), acc)


@njit(inline="always")
def _q6_k_vector(w, x, xs, y, lo, hi):
    """Q6_K rows on AVX2: per 128 weights, four 32-code dots give eight sub-block sums (sums4)."""
    tokens, supers = x.shape[0], xs.shape[1] // 8
    for r in range(lo, hi):
        wr = w[r]
        for t in range(tokens):
            xt, xst = x[t], xs[t]
            acc = fzero()
            for sb in range(supers):
                at, c = sb * Q6_K_BYTES, sb * 256
                acc = _q6_k_half(wr, at, 0, xt, xst, c, acc)
                acc = _q6_k_half(wr, at, 1, xt, xst, c + 128, acc)
            store(y, t, r, total(acc))


def ggml_rows(w, x, xo, xs, xz, y, lo, hi, kind):
    """Rows of ggml blocks of ``kind`` (arguments as ggml_portable's): the AVX2 kernels where the target has AVX2,
    else ggml_portable. The kind is tested once per call, outside the loops."""


@overload(ggml_rows)
def _ggml_rows(w, x, xo, xs, xz, y, lo, hi, kind):
    if not vectors.AVX2:
        return lambda w, x, xo, xs, xz, y, lo, hi, kind: ggml_portable(w, x, xo, xs, xz, y, lo, hi, kind)

    def rows_avx2(w, x, xo, xs, xz, y, lo, hi, kind):
        if kind == Q8_0:
            _q8_0_vector(w, x, xs, y, lo, hi)
        elif kind == Q4_0:
            _halves_vector(w, x, xo, xs, xz, y, lo, hi, False)
        elif kind == MXFP4:
            _halves_vector(w, x, xo, xs, xz, y, lo, hi, True)
        elif kind == Q4_K:
            _q4_k_vector(w, x, xs, xz, y, lo, hi)
        else:
            _q6_k_vector(w, x, xs, y, lo, hi)

    return rows_avx2


# -- MXFP4 as gpt-oss's safetensors hold it: codes w uint8 [N, K/2] (byte j: input 2j low, 2j + 1 high, 16 bytes a
#    block of 32) and E8M0 exponents e uint8 [N, K/32] in a tensor of their own; activations split even / odd. ------


@njit(inline="always")
def _mxfp4_plain_block(wr, er, b, xet, xot, scale):
    """Block b of a row against its even / odd activation codes: 2^(e - 128) x scale x dot of the doubled values."""
    d = 0
    for j in range(b * 16, b * 16 + 16):
        q = wr[j]
        d += np.int32(MXFP4_VALUES[q & np.uint8(15)]) * np.int32(xet[j]) + np.int32(
            MXFP4_VALUES[q >> np.uint8(4)]) * np.int32(xot[j])
    return intrinsics.e8m0_half(er[b]) * scale * np.float32(np.int32(d))


@njit(cache=True, nogil=True, fastmath=True)
def mxfp4_portable(w, e, xe, xo, xs, y, lo, hi):
    """Rows lo..hi of y [T, N] from MXFP4 codes and exponents as gpt-oss stores them (above) times int8 codes of the
    even / odd inputs (xe / xo [T, K/2], EVEN_ODD) with a scale per 32 inputs (xs [T, K/32])."""
    tokens, blocks = xe.shape[0], xs.shape[1]
    for r in range(lo, hi):
        for t in range(tokens):
            acc = np.float32(0.0)
            for b in range(blocks):
                acc += _mxfp4_plain_block(w[r], e[r], b, xe[t], xo[t], xs[t, b])
            store(y, t, r, acc)


@njit(inline="always")
def _mxfp4_plain_vector(w, e, xe, xo, xs, y, lo, hi):
    """mxfp4_portable on AVX2: 32 code bytes (two blocks) per lookup-and-dot, eight blocks reduced at once."""
    tokens, blocks = xe.shape[0], xs.shape[1]
    whole = blocks - blocks % 8
    for r in range(lo, hi):
        wr, er = w[r], e[r]
        for t in range(tokens):
            xet, xot, xst = xe[t], xo[t], xs[t]
            acc = fzero()
            for b in range(0, whole, 8):
                c = b * 16
                d = sums4(vectors.dot_mxfp4_plain(wr, xet, xot, c), vectors.dot_mxfp4_plain(wr, xet, xot, c + 32),
                          vectors.dot_mxfp4_plain(wr, xet, xot, c + 64),
                          vectors.dot_mxfp4_plain(wr, xet, xot, c + 96))
                acc = fma(vectors.to_float(d), fmul(vectors.load8_e8m0_half(er, b), load8(xst, b)), acc)
            tail = np.float32(0.0)
            for b in range(whole, blocks):
                tail += _mxfp4_plain_block(wr, er, b, xet, xot, xst[b])
            store(y, t, r, total(acc) + tail)


def mxfp4_rows(w, e, xe, xo, xs, y, lo, hi):
    """MXFP4 rows as gpt-oss stores them: the AVX2 kernel where the target has AVX2, else mxfp4_portable."""


@overload(mxfp4_rows)
def _mxfp4_rows(w, e, xe, xo, xs, y, lo, hi):
    if not vectors.AVX2:
        return lambda w, e, xe, xo, xs, y, lo, hi: mxfp4_portable(w, e, xe, xo, xs, y, lo, hi)
    return lambda w, e, xe, xo, xs, y, lo, hi: _mxfp4_plain_vector(w, e, xe, xo, xs, y, lo, hi)


@njit(cache=True, nogil=True)
def dequantize_mxfp4(w, e, out):
    """MXFP4 codes w [N, K/2] and exponents e [N, K/32] as gpt-oss stores them -> float32 out [N, K], exactly."""
    n, k = out.shape
    for r in range(n):
        for j in range(k // 2):
            d = intrinsics.e8m0_half(e[r, j // 16])
            out[r, 2 * j] = d * np.float32(MXFP4_VALUES[w[r, j] & np.uint8(15)])
            out[r, 2 * j + 1] = d * np.float32(MXFP4_VALUES[w[r, j] >> np.uint8(4)])


@njit(inline="always")
def _block_values(wr, b, kind, out_row):
    """Block b of a row of ``kind`` decoded into out_row's weights, exactly as ggml decodes them."""
    at = b * BLOCK_BYTES[kind]
    start = b * BLOCK_WEIGHTS[kind]
    if kind == MXFP4:
        d = intrinsics.e8m0_half(wr[at])
        for j in range(16):
            q = wr[at + 1 + j]
            out_row[start + j] = d * np.float32(MXFP4_VALUES[q & np.uint8(15)])
            out_row[start + 16 + j] = d * np.float32(MXFP4_VALUES[q >> np.uint8(4)])
    elif kind == Q8_0 or kind == Q4_0:
        d = _block_scale(wr, at)
        for j in range(16 if kind == Q4_0 else 32):
            q = wr[at + 2 + j]
            if kind == Q4_0:
                out_row[start + j] = d * np.float32(np.int32(q & np.uint8(15)) - 8)
                out_row[start + 16 + j] = d * np.float32(np.int32(q >> np.uint8(4)) - 8)
            else:
                out_row[start + j] = d * np.float32(np.int8(q))
    elif kind == Q4_K:
        d, dmin = _block_scale(wr, at), _block_scale(wr, at + 2)
        for j in range(8):
            sc, mn = _k4_scale_min(wr, at, j)
            scale, low = d * np.float32(sc), dmin * np.float32(mn)
            for i in range(32 * j, 32 * j + 32):
                out_row[start + i] = scale * np.float32(_q4_k_code(wr, at, i)) - low
    else:
        d = _block_scale(wr, at + 208)
        for i in range(256):
            out_row[start + i] = d * np.float32(np.int8(wr[at + 192 + i // 16])) * np.float32(_q6_k_code(wr, at, i))


@njit(cache=True, nogil=True)
def dequantize_blocks(w, kind, out):
    """Rows of ``kind`` blocks [N, bytes] -> float32 out [N, K]: prefill's GEMM weight, exactly ggml's."""
    n, k = out.shape
    for r in range(n):
        for b in range(k // BLOCK_WEIGHTS[kind]):
            _block_values(w[r], b, kind, out[r])


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
            store(y, t, r, acc)


@njit(cache=True, nogil=True)
def widen_into(bits, x, half):
    """bf16 bits (or IEEE half bits when ``half``) [T, K] -> float32 x [T, K], exactly."""
    tokens, k = bits.shape
    for t in range(tokens):
        if half:
            for i in range(k):
                x[t, i] = widen_half(bits[t, i])
        else:
            for i in range(k):
                x[t, i] = widen(bits[t, i])


@njit(cache=True, nogil=True, fastmath=True)
def quantize_rows(x, block, xe, xo, xs, xz, qmax, split):
    """Symmetric per-block quantization of activations x float32 [T, K] into int8 or int16 codes, with scale
    xs [T, K/block] = absmax / qmax and xz = xs * sum(codes in block) for the weights' zero-point term (llama.cpp's
    Q8 activations; int16 keeps the error near 1e-5 relative). ``split`` puts the codes where the weights' nibbles
    meet them: WHOLE all to xe [T, K]; EVEN_ODD even inputs to xe, odd ones to xo (plain nibble packing, [T, K/2]
    each); HALVES the first 16 inputs of every 32 to xe, the last 16 to xo (Q4_0's nibble order)."""
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
                if split == WHOLE:
                    xe[t, i] = q
                elif split == EVEN_ODD:
                    if i % 2 == 0:
                        xe[t, i // 2] = q
                    else:
                        xo[t, i // 2] = q
                elif i % 32 < 16:
                    xe[t, i // 32 * 16 + i % 16] = q
                else:
                    xo[t, i // 32 * 16 + i % 16] = q
                total += q
            xs[t, b] = scale
            xz[t, b] = scale * total


cache.tie(globals())
