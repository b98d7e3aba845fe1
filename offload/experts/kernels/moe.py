"""A MoE layer's experts at decode in two calls to the kernel pool, rather than three or more Python calls each.

Per expert, the unfused path costs a gather of its tokens, the gate/up kernel call, torch's activation and
product, the down call and a weighted scatter: about a dozen small torch ops and two pool hand-offs, ~50 us of
Python per expert (scripts/bench_moe_layer.py: 2.9 ms a token over 48 experts of a top-8 model). Here a
layer step's (token, top-k place) pairs are sorted by expert once; every expert's rows of gate and up and the
activation run as one job (jobs.MOE_UP, threads splitting the inner rows), then every expert's down rows, times the
routing weights, into the tokens' cells (jobs.MOE_DOWN, threads splitting the hidden rows).

Each value is rounded where torch's unfused ops round it (bf16 after each projection, the activation and the
product), so the fused and the unfused call give the same numbers; an expert's result never depends on which other
experts share its call. Only experts whose projections all have a kernel and no bias take part (layouts.py's
Expert.jobs: their three weight halves, the table's rows); the others run unfused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from offload.experts.kernels import jobs
from offload.experts.kernels.pool import DECODE_TOKENS, pool

ACTIVATIONS = {"swiglu": jobs.SWIGLU, "geglu-tanh": jobs.GEGLU_TANH}  # the expert activations the phases compute
_DTYPES = {torch.bfloat16: jobs.BF16, torch.float32: jobs.F32}


@dataclass(frozen=True)
class Routes:
    """A layer step's (token, top-k place) pairs sorted by expert (stable), so each expert's rows are contiguous.

    Row r is cell ``cells[r]`` = token * k + place of the step's [tokens, k, hidden] output; expert e owns rows
    ``starts[e]`` .. ``starts[e] + counts[e]``.
    """

    x: torch.Tensor        # [tokens * k, hidden]: each row's token's activations, contiguous
    cells: np.ndarray      # int64 [tokens * k]
    weights: np.ndarray    # float32 [tokens * k]: each row's routing weight
    starts: np.ndarray     # int64 [experts]
    counts: np.ndarray     # int64 [experts]

    def needed(self) -> list[int]:
        """The experts the step routes to, ascending (as torch.unique's order)."""
        return np.flatnonzero(self.counts).tolist()


def routes(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, num_experts: int) -> Routes:
    """x: [tokens, hidden]; experts, weights: [tokens, k] -> the sorted rows (a few numpy ops and one gather)."""
    flat = experts.reshape(-1).numpy()
    cells = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=num_experts)
    rows = torch.from_numpy(cells // experts.shape[1])
    return Routes(x[rows].contiguous(), cells, weights.reshape(-1).float().numpy()[cells], np.cumsum(counts) - counts,
                  counts)


def applies(x: torch.Tensor, out: torch.Tensor, activation: str) -> bool:
    """Whether a step's experts can take the fused call: decode-sized, on the CPU, in a dtype and activation it has."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and len(x) <= DECODE_TOKENS and activation in ACTIVATIONS
            and out.dtype in (torch.float32, x.dtype) and out.is_contiguous())


class FusedExperts:
    """The scratch of fused layer calls (gate, up, activation and down rows), grown to the largest step seen and
    reused: a token's step allocates nothing here after the first."""

    def __init__(self) -> None:
        self._scratch = torch.empty(0, dtype=torch.float32)

    def _buffers(self, rows: int, inner: int, hidden: int) -> tuple[torch.Tensor, ...]:
        sizes = (rows * inner, rows * inner, rows * inner, rows * hidden)  # gate, up, act, down (float32 each)
        if self._scratch.numel() < sum(sizes):
            self._scratch = torch.empty(sum(sizes), dtype=torch.float32)
        return self._scratch[: sum(sizes)].split(sizes)

    def run(self, routes: Routes, experts: Sequence[int], halves: Sequence[np.ndarray], out: torch.Tensor,
            activation: str) -> None:
        """``experts`` (ids), each with its three weight halves [3, jobs.FIELDS] (gate, up, down), over their rows of
        ``routes``, into ``out``'s cells ([tokens, k, hidden], float32 or the compute dtype)."""
        ids = np.array(experts, dtype=np.int64)
        table = np.stack(halves)  # [experts, 3, FIELDS]: the weight halves, call halves filled in below
        inner, hidden = int(table[0, 0, jobs.N]), int(table[0, 2, jobs.N])
        if (table[:, :2, jobs.N] != inner).any() or (table[:, 2, jobs.N] != hidden).any():
            raise ValueError("a fused layer call needs experts of one shape")
        total, x = len(routes.cells), routes.x
        gate, up, act, down = self._buffers(total, inner, hidden)
        starts, counts = routes.starts[ids], routes.counts[ids]
        kind, width = _DTYPES[x.dtype], x.element_size()
        table[:, :, jobs.TOKENS] = counts[:, None]
        table[:, :2, jobs.X] = x.data_ptr() + (starts * hidden * width)[:, None]
        table[:, 0, jobs.Y] = gate.data_ptr() + starts * inner * 4
        table[:, 1, jobs.Y] = up.data_ptr() + starts * inner * 4
        table[:, 2, jobs.X] = act.data_ptr() + starts * inner * width  # act holds compute-dtype values
        table[:, 2, jobs.Y] = down.data_ptr() + starts * hidden * 4
        table[:, :, jobs.XKIND] = kind
        table[:, :, jobs.YKIND] = jobs.F32
        phase = np.zeros(jobs.FIELDS, dtype=np.int64)
        phase[[jobs.EXPERTS, jobs.TABLE, jobs.STARTS, jobs.GATE, jobs.UP, jobs.ACT, jobs.DOWN, jobs.OUT]] = (
            len(ids), table.ctypes.data, starts.ctypes.data, gate.data_ptr(), up.data_ptr(), act.data_ptr(),
            down.data_ptr(), out.data_ptr())
        phase[[jobs.CELLS, jobs.WEIGHTS, jobs.DTYPE, jobs.ACTIVATION, jobs.INNER, jobs.HIDDEN, jobs.OUTKIND,
               jobs.OUTROWS]] = (routes.cells.ctypes.data, routes.weights.ctypes.data, kind, ACTIVATIONS[activation],
                                 inner, hidden, _DTYPES[out.dtype], total)
        phase[jobs.KIND], phase[jobs.N] = jobs.MOE_UP, inner
        pool().run_job(phase)
        phase[jobs.KIND], phase[jobs.N] = jobs.MOE_DOWN, hidden
        pool().run_job(phase)
