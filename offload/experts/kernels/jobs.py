"""A kernel call as plain numbers: what the pool's workers run without ever holding Python's GIL.

A worker that had to return to Python for each job waited ~60 us for the GIL while the caller marshalled its own
call (measured: the second half of a 3584x1024 GEMV started 60 us late, so two threads ran a token no faster than
one). So a call is written into an int64 descriptor (the kernel kind, the shapes, the arrays' addresses) and
``run`` rebuilds the arrays with numba.carray and calls the kernel, on the caller's thread and on the workers'
alike. The tensors must stay alive until the pool returns (the callers hold them).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import carray, njit

from offload.experts.kernels import cache, rows
from offload.experts.kernels.intrinsics import ptr_float32, ptr_int8, ptr_int16, ptr_uint8, ptr_uint16

# kinds: float weights, then integer weights x activation codes
BF16, F16, F32, INT4_A8, INT4_A16, INT8_A8, INT8_A16 = range(7)
KIND, N, K, TOKENS, GROUPS, BLOCKS, W, S, M, X, XO, XS, XZ, Y = range(14)  # descriptor fields
FIELDS = 16


def float_job(kind: int, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """w [N, K] (bf16 / f16 / f32), x float32 [T, K], y float32 [T, N]: contiguous CPU tensors."""
    n, k = w.shape
    return np.array([kind, n, k, x.shape[0], 0, 0, w.data_ptr(), 0, 0, x.data_ptr(), 0, 0, 0, y.data_ptr(), 0, 0],
                    dtype=np.int64)


@njit(cache=True, nogil=True)
def run(d, lo, hi):
    """Rows lo..hi of the call described by ``d``."""
    kind, n, k, tokens = d[KIND], d[N], d[K], d[TOKENS]
    y = carray(ptr_float32(d[Y]), (tokens, n))
    if kind <= F32:
        x = carray(ptr_float32(d[X]), (tokens, k))
        if kind == F32:
            rows.float_rows(carray(ptr_float32(d[W]), (n, k)), x, y, lo, hi, False)
        else:
            rows.float_rows(carray(ptr_uint16(d[W]), (n, k)), x, y, lo, hi, kind == F16)
        return
    groups, blocks = d[GROUPS], d[BLOCKS]
    s, m = carray(ptr_float32(d[S]), (n, groups)), carray(ptr_float32(d[M]), (n, groups))
    xs, xz = carray(ptr_float32(d[XS]), (tokens, blocks)), carray(ptr_float32(d[XZ]), (tokens, blocks))
    if kind == INT4_A8 or kind == INT4_A16:
        w = carray(ptr_uint8(d[W]), (n, k // 2))
        if kind == INT4_A8:
            rows.int8_activation_rows(w, s, m, carray(ptr_int8(d[X]), (tokens, k // 2)),
                                      carray(ptr_int8(d[XO]), (tokens, k // 2)), xs, xz, y, lo, hi)
        else:
            rows.int_rows(w, s, m, carray(ptr_int16(d[X]), (tokens, k // 2)),
                          carray(ptr_int16(d[XO]), (tokens, k // 2)), xs, xz, y, lo, hi)
        return
    w8 = carray(ptr_int8(d[W]), (n, k))
    if kind == INT8_A8:
        x8 = carray(ptr_int8(d[X]), (tokens, k))
        rows.int8_activation_rows(w8, s, m, x8, x8, xs, xz, y, lo, hi)
    else:
        x16 = carray(ptr_int16(d[X]), (tokens, k))
        rows.int_rows(w8, s, m, x16, x16, xs, xz, y, lo, hi)


cache.tie(globals())
