"""A decode step's small dense ops as compiled loops: RMSNorm over a few rows and RoPE of a few tokens, on the CPU
in bf16 or float32.

torch's RMSNorm is 7 ops a call (cast, square, mean, add, rsqrt, multiply, cast, times the weight): 18-36 us of
dispatch for ~1 us of arithmetic at decode, paid 2 + 1 times a layer (and q/k norms where a family has them); here
it is one numba call, 8 us (2-core EPYC, one 1024-wide bf16 row). The arithmetic is the reference's: float32 sum of
squares, mean, 1/sqrt, the product rounded to the compute dtype, then times the weight, rounded again. Only the
order of the float32 sum differs from torch's (1e-7 relative), so a result differs from torch's in the last bit of
a float32 at most, and from a bf16 one only where that bit tips a rounding, as offload's GEMV kernels already do.

RoPE (half-rotation, transformers' ``rotate_half`` form) is 6 ops a call, twice a layer; here one loop rounding
where torch's ops round (x cos, rotate_half(x) sin, their sum: each to the compute dtype), so its results are
torch's bit for bit.

Attention of a decode step's query over the KV cache was tried the same way (one loop over the cache's bf16 keys
and values, without torch's float32 copies of them): 37 / 66 / 260 us against torch's 38 / 81 / 275 us at 64 / 200
/ 1000 keys on one thread (16 query heads, 4 kv heads of 64), too little to keep a second implementation for;
its exps and the per-key dots need the rope and cache write fused in before it pays.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit
from numba.extending import overload

from offload.experts.kernels import cache, intrinsics
from offload.experts.kernels.rows import widen

MAX_ROWS = 16  # calls with more rows (prefill) keep torch's ops, which vectorize across rows
_FAST = {"reassoc", "contract", "nsz", "arcp"}  # not nnan / ninf: a NaN or Inf input must come out non-finite


def _bits(t: torch.Tensor) -> np.ndarray:
    """A CPU bf16 / float32 tensor as the numpy array the loops read (bf16 as its uint16 bits), sharing memory."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def narrow(value, like):
    """A float32 as the stored kind of ``like`` (a stored value): float32 as it is, bf16 bits rounded to nearest
    even."""


@overload(narrow, inline="always")
def _narrow(value, like):
    if like == numba.float32:
        return lambda value, like: np.float32(value)
    return lambda value, like: intrinsics.f32_to_bf16(np.float32(value))


@njit(cache=True, nogil=True, fastmath=_FAST)
def _rms_rows(x, w, eps, out):
    """out[r] = w * (x[r] * 1/sqrt(mean(x[r]^2) + eps)) for x [rows, n], with the reference's two roundings."""
    rows, n = x.shape
    for r in range(rows):
        squares = np.float32(0.0)
        for i in range(n):
            v = widen(x[r, i])
            squares += v * v
        scale = np.float32(1.0) / np.sqrt(squares / np.float32(n) + np.float32(eps))
        for i in range(n):
            normed = widen(narrow(widen(x[r, i]) * scale, x[r, i]))
            out[r, i] = narrow(widen(w[i]) * normed, x[r, i])


def rms_norm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether rms_norm takes the compiled loop: a few contiguous rows on the CPU, weight of the same float kind."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and weight.dtype == x.dtype
            and weight.device.type == "cpu" and weight.dim() == 1 and x.shape[-1] == weight.shape[0]
            and x.is_contiguous() and weight.is_contiguous() and x.numel() <= MAX_ROWS * x.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., n] by weight [n] (rms_norm_runs must hold): as model.attention.rms_norm computes it."""
    out = torch.empty_like(x)
    n = x.shape[-1]
    _rms_rows(_bits(x).reshape(-1, n), _bits(weight), eps, _bits(out).reshape(-1, n))
    return out


@njit(cache=True, nogil=True)  # no fastmath: each product and the sum round as torch's ops do, FMA-free
def _rope_rows(x, cos, sin, out):
    """out = x cos + rotate_half(x) sin over the first ``dim`` dims of x [B, H, T, D] (the rest copied); cos, sin
    [1 | B, 1, T, dim]."""
    batch, heads, tokens, width = x.shape
    dim = cos.shape[3]
    half = dim // 2
    for b in range(batch):
        cb = min(b, cos.shape[0] - 1)
        for h in range(heads):
            for t in range(tokens):
                xr, orow, c, s = x[b, h, t], out[b, h, t], cos[cb, 0, t], sin[cb, 0, t]
                for i in range(dim):
                    other = -widen(xr[i + half]) if i < half else widen(xr[i - half])
                    first = widen(narrow(widen(xr[i]) * widen(c[i]), xr[i]))
                    second = widen(narrow(other * widen(s[i]), xr[i]))
                    orow[i] = narrow(first + second, xr[i])
                for i in range(dim, width):
                    orow[i] = xr[i]


def rope_runs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether apply_rope (half-rotation) takes the compiled loop: a few tokens on the CPU, cos and sin of x's
    dtype and of [1 | batch, 1, tokens, dim <= head dim]."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and x.dim() == 4
            and cos.dtype == sin.dtype == x.dtype and cos.dim() == 4 and cos.shape == sin.shape
            and cos.shape[0] in (1, x.shape[0]) and cos.shape[1] == 1 and cos.shape[2] == x.shape[2]
            and cos.shape[3] % 2 == 0 and cos.shape[3] <= x.shape[3] and x.shape[2] <= MAX_ROWS
            and cos.device.type == "cpu")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model.rope.apply_rope's half-rotation of x [B, H, T, D] (rope_runs must hold), bit for bit."""
    out = torch.empty(x.shape, dtype=x.dtype)
    _rope_rows(_bits(x), _bits(cos), _bits(sin), _bits(out))
    return out


cache.tie(globals())
