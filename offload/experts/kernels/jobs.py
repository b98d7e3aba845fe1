"""A kernel call as plain numbers: what the pool's workers run without ever holding Python's GIL.

A worker that had to return to Python for each job waited ~60 us for the GIL while the caller marshalled its own
call (measured: the second half of a 3584x1024 GEMV started 60 us late, so two threads ran a token no faster than
one). So a call is written into an int64 descriptor (the kernel kind, the shapes, the arrays' addresses) and
``run`` rebuilds the arrays with numba.carray and calls the kernel, on the caller's thread and on the workers'
alike. The tensors must stay alive until the pool returns (the callers hold them).

The activations arrive as the caller's tensor (bf16, f16 or float32 bits) and the output leaves in the caller's
dtype (bf16 rounded to nearest even, like torch's; float32 otherwise): each thread widens, and for integer
weights quantizes, the few activation values itself, so a call is one torch allocation and one numba call (the
torch conversions around the kernel cost ~30 us per call, more than a small matrix takes).
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit

from offload.experts.kernels import cache, intrinsics, rows
from offload.experts.kernels.intrinsics import ptr_float32, ptr_int8, ptr_int64, ptr_uint8, ptr_uint16

# kinds: float weights (also the activations' and outputs' kinds), integer weights x activation codes, ggml blocks
# (GGUF), and MXFP4 as gpt-oss's safetensors hold it
BF16, F16, F32, INT4_A8, INT4_A16, INT8_A8, INT8_A16 = range(7)
Q8_0_A8, Q4_0_A8, Q4_K_A8, Q6_K_A8, MXFP4_A8, MXFP4_PLAIN_A8 = range(7, 13)
# a fused MoE layer (moe.py) in two phases: every expert's gate and up rows with the activation, then down's rows
MOE_UP, MOE_DOWN = 13, 14
# descriptor fields: the weight half (made once per weight), then the call half
KIND, N, K, GROUPS, BLOCKS, W, S, M, TOKENS, X, XKIND, Y, YKIND = range(13)
# a phase's fields after KIND and N (N: the rows the threads split, the experts' inner size or the hidden size)
(EXPERTS, TABLE, STARTS, GATE, UP, ACT, DOWN, OUT, CELLS, WEIGHTS, DTYPE, ACTIVATION, INNER, HIDDEN, OUTKIND,
 OUTROWS) = range(2, 18)
FIELDS = 24
# activations a phase computes (moe.py's registry maps the model's names onto these)
SWIGLU, GEGLU_TANH = range(2)


def weight_base(kind: int, n: int, k: int, w: int, groups: int = 0, blocks: int = 0, s: int = 0,
                m: int = 0) -> np.ndarray:
    """The weight half of a descriptor: kind, shape [n, k], addresses of the codes / scales / mins."""
    return np.array((kind, n, k, groups, blocks, w, s, m) + (0,) * (FIELDS - TOKENS), np.int64)


@njit(cache=True, nogil=True)
def _activations(d, tokens, k):
    """The call's activations [tokens, k] as float32: the caller's array itself, or a widened copy."""
    kind = d[XKIND]
    if kind == F32:
        return carray(ptr_float32(d[X]), (tokens, k))
    bits = carray(ptr_uint16(d[X]), (tokens, k))
    x = np.empty((tokens, k), np.float32)
    rows.widen_into(bits, x, kind == F16)
    return x


@njit(cache=True, nogil=True)
def run(d, lo, hi):
    """Rows lo..hi of the call described by ``d``: one matrix, or a phase of a fused MoE layer."""
    if d[KIND] == MOE_UP:
        _moe_up(d, lo, hi)
    elif d[KIND] == MOE_DOWN:
        _moe_down(d, lo, hi)
    else:
        _matrix(d, lo, hi)


@njit(nogil=True)
def _matrix(d, lo, hi):
    kind, n, k, tokens = d[KIND], d[N], d[K], d[TOKENS]
    x = _activations(d, tokens, k)
    if d[YKIND] == BF16:
        _dispatch(d, kind, n, k, tokens, x, carray(ptr_uint16(d[Y]), (tokens, n)), lo, hi)
    else:
        _dispatch(d, kind, n, k, tokens, x, carray(ptr_float32(d[Y]), (tokens, n)), lo, hi)


@njit(nogil=True, inline="always")
def _dispatch(d, kind, n, k, tokens, x, y, lo, hi):
    if kind <= F32:
        if kind == F32:
            rows.float_rows(carray(ptr_float32(d[W]), (n, k)), x, y, lo, hi, False)
        else:
            rows.float_rows(carray(ptr_uint16(d[W]), (n, k)), x, y, lo, hi, kind == F16)
        return
    if kind == MXFP4_PLAIN_A8:  # gpt-oss's safetensors: codes at W, exponents at S
        xs = np.empty((tokens, k // 32), np.float32)
        xe, xo = np.empty((tokens, k // 2), np.int8), np.empty((tokens, k // 2), np.int8)
        rows.quantize_rows(x, 32, xe, xo, xs, np.empty((tokens, k // 32), np.float32), 127, rows.EVEN_ODD)
        rows.mxfp4_rows(carray(ptr_uint8(d[W]), (n, k // 2)), carray(ptr_uint8(d[S]), (n, k // 32)), xe, xo, xs, y,
                        lo, hi)
        return
    if kind >= Q8_0_A8:
        _ggml(d, kind, n, k, tokens, x, y, lo, hi)
        return
    groups, blocks = d[GROUPS], d[BLOCKS]
    s, m = carray(ptr_float32(d[S]), (n, groups)), carray(ptr_float32(d[M]), (n, groups))
    block = k // blocks
    xs, xz = np.empty((tokens, blocks), np.float32), np.empty((tokens, blocks), np.float32)
    if kind == INT4_A8 or kind == INT4_A16:
        w = carray(ptr_uint8(d[W]), (n, k // 2))
        if kind == INT4_A8:
            xe, xo = np.empty((tokens, k // 2), np.int8), np.empty((tokens, k // 2), np.int8)
            rows.quantize_rows(x, block, xe, xo, xs, xz, 127, rows.EVEN_ODD)
            rows.int8_activation_rows(w, s, m, xe, xo, xs, xz, y, lo, hi)
        else:
            xe16, xo16 = np.empty((tokens, k // 2), np.int16), np.empty((tokens, k // 2), np.int16)
            rows.quantize_rows(x, block, xe16, xo16, xs, xz, 32767, rows.EVEN_ODD)
            rows.int_rows(w, s, m, xe16, xo16, xs, xz, y, lo, hi)
        return
    w8 = carray(ptr_int8(d[W]), (n, k))
    if kind == INT8_A8:
        x8 = np.empty((tokens, k), np.int8)
        rows.quantize_rows(x, block, x8, x8, xs, xz, 127, rows.WHOLE)
        rows.int8_activation_rows(w8, s, m, x8, x8, xs, xz, y, lo, hi)
    else:
        x16 = np.empty((tokens, k), np.int16)
        rows.quantize_rows(x, block, x16, x16, xs, xz, 32767, rows.WHOLE)
        rows.int_rows(w8, s, m, x16, x16, xs, xz, y, lo, hi)


@njit(nogil=True, inline="always")
def _ggml(d, kind, n, k, tokens, x, y, lo, hi):
    """ggml's Q8_0 / Q4_0 / Q4_K / Q6_K / MXFP4 rows as the GGUF file lays them out, against activations quantized per
    block of 32 (llama.cpp quantizes per 256 for the K types; per 32 is the finer of the two)."""
    blocks = k // 32
    xs, xz = np.empty((tokens, blocks), np.float32), np.empty((tokens, blocks), np.float32)
    size = rows.BLOCK_BYTES[kind - Q8_0_A8] * k // rows.BLOCK_WEIGHTS[kind - Q8_0_A8]
    w = carray(ptr_uint8(d[W]), (n, size))
    if kind == Q4_0_A8 or kind == MXFP4_A8:  # their nibbles pair each block's first and second halves
        x8, xo = np.empty((tokens, k // 2), np.int8), np.empty((tokens, k // 2), np.int8)
        rows.quantize_rows(x, 32, x8, xo, xs, xz, 127, rows.HALVES)
    else:
        x8 = np.empty((tokens, k), np.int8)
        xo = x8
        rows.quantize_rows(x, 32, x8, x8, xs, xz, 127, rows.WHOLE)
    rows.ggml_rows(w, x8, xo, xs, xz, y, lo, hi, kind - Q8_0_A8)


# -- a fused MoE layer ------------------------------------------------------------------------------------------
# Each expert's rows sit together: expert e owns rows STARTS[e] .. + its TOKENS of the gathered activations, of the
# GATE / UP / ACT / DOWN scratch and of CELLS / WEIGHTS (OUTROWS rows in all: one per token and top-k place, and as
# many cells of OUT); TABLE holds its three matrix descriptors (gate, up, down) with
# their call halves filled in (moe.py). Intermediate values are rounded to the compute dtype wherever torch's
# unfused ops would round them (DTYPE BF16), so both paths give the same numbers.


@njit(nogil=True, inline="always")
def _rounded(value, bf16):
    return rows.widen(intrinsics.f32_to_bf16(np.float32(value))) if bf16 else np.float32(value)


@njit(nogil=True, inline="always")
def _activation(g, activation):
    if activation == SWIGLU:  # silu, as torch: x / (1 + exp(-x)) in float32
        return np.float32(g / (np.float32(1.0) + np.exp(-g)))
    inner = np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g * g * g)  # GeGLU's tanh GELU
    return np.float32(np.float32(0.5) * g * (np.float32(1.0) + np.tanh(inner)))


@njit(nogil=True)
def _moe_up(d, lo, hi):
    """Rows lo..hi of every expert's gate and up, and act = f(gate) * up over them (in the compute dtype)."""
    experts, inner, bf16 = d[EXPERTS], d[INNER], d[DTYPE] == BF16
    table, starts = carray(ptr_int64(d[TABLE]), (experts, 3, FIELDS)), carray(ptr_int64(d[STARTS]), experts)
    total = d[OUTROWS]  # every (token, top-k place) is one row of the sorted arrays and one cell of OUT
    gate, up = carray(ptr_float32(d[GATE]), (total, inner)), carray(ptr_float32(d[UP]), (total, inner))
    act16, act32 = carray(ptr_uint16(d[ACT]), (total, inner)), carray(ptr_float32(d[ACT]), (total, inner))
    for e in range(experts):
        _matrix(table[e, 0], lo, hi)
        _matrix(table[e, 1], lo, hi)
        for t in range(starts[e], starts[e] + table[e, 0, TOKENS]):
            for j in range(lo, hi):
                g = _rounded(_activation(_rounded(gate[t, j], bf16), d[ACTIVATION]), bf16)
                a = _rounded(g * _rounded(up[t, j], bf16), bf16)
                if bf16:
                    act16[t, j] = intrinsics.f32_to_bf16(a)
                else:
                    act32[t, j] = a


@njit(nogil=True)
def _moe_down(d, lo, hi):
    """Rows lo..hi of every expert's down, each token's times its routing weight into its cell of OUT."""
    experts, hidden, bf16, bf16_out = d[EXPERTS], d[HIDDEN], d[DTYPE] == BF16, d[OUTKIND] == BF16
    table, starts = carray(ptr_int64(d[TABLE]), (experts, 3, FIELDS)), carray(ptr_int64(d[STARTS]), experts)
    total = d[OUTROWS]  # every (token, top-k place) is one row of the sorted arrays and one cell of OUT
    down = carray(ptr_float32(d[DOWN]), (total, hidden))
    cells, weights = carray(ptr_int64(d[CELLS]), total), carray(ptr_float32(d[WEIGHTS]), total)
    out16, out32 = carray(ptr_uint16(d[OUT]), (total, hidden)), carray(ptr_float32(d[OUT]), (total, hidden))
    for e in range(experts):
        _matrix(table[e, 2], lo, hi)
        for t in range(starts[e], starts[e] + table[e, 2, TOKENS]):
            for j in range(lo, hi):
                value = _rounded(down[t, j], bf16) * weights[t]
                if bf16_out:
                    out16[cells[t], j] = intrinsics.f32_to_bf16(value)
                else:
                    out32[cells[t], j] = value


cache.tie(globals())
