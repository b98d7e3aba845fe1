"""Every kernel the CPU path calls, loaded before the first token rather than during it.

numba loads a kernel from its on-disk cache (~1 s for all of them) or, on a fresh install or after a kernel source
changed, compiles it (~80 s for the pool's job dispatcher on 2 cores) at its first call. Called at load, so a
server's first request, a chat's first reply and a benchmark's first timed token never pay it, and a capped process
has the ~100 MB of LLVM and code in its usage before it sizes the expert budget.
"""

from __future__ import annotations

import numpy as np
import torch

from offload.experts.kernels import dense, rows
from offload.experts.kernels.linear import float_linear
from offload.experts.kernels.pool import ROW_ALIGN


def warm() -> None:
    """One tiny call of each compiled entry point: the job dispatcher through the pool (which starts the pool's
    threads) and alone (a job too small to split), RMSNorm and RoPE in both dtypes, and prefill's block
    dequantizer."""
    for dtype in (torch.bfloat16, torch.float32):
        for rows_ in (4 * ROW_ALIGN, ROW_ALIGN):
            float_linear(torch.zeros(1, 32, dtype=dtype), torch.zeros(rows_, 32, dtype=dtype))
        dense.rms_norm(torch.zeros(1, 32, dtype=dtype), torch.ones(32, dtype=dtype), 1e-6)
        table = torch.ones(1, 1, 1, 8, dtype=dtype)  # [1, 1, tokens, dim]
        for x in (torch.zeros(1, 2, 1, 8, dtype=dtype), torch.zeros(1, 1, 2, 8, dtype=dtype).transpose(1, 2)):
            dense.rope(x, table, table)  # [1, heads, tokens, head dim]: contiguous keys, strided queries
    rows.dequantize_blocks(np.zeros((1, 34), np.uint8), rows.Q8_0, np.empty((1, 32), np.float32))
