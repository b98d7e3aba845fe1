"""A decode step's small dense ops as compiled loops: RMSNorm over a few rows, on the CPU in bf16 or float32.

torch's RMSNorm is 7 ops a call (cast, square, mean, add, rsqrt, multiply, cast, times the weight): 18-36 us of
dispatch for ~1 us of arithmetic at decode, paid 2 + 1 times a layer (and q/k norms where a family has them); here
it is one numba call, 8 us (2-core EPYC, one 1024-wide bf16 row). The arithmetic is the reference's: float32 sum of
squares, mean, 1/sqrt, the product rounded to the compute dtype, then times the weight, rounded again. Only the
order of the float32 sum differs from torch's (1e-7 relative), so a result differs from torch's in the last bit of
a float32 at most, and from a bf16 one only where that bit tips a rounding, as offload's GEMV kernels already do.

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


cache.tie(globals())
