"""Hand-made routing traces for the predictor tests (no file needed; ``save`` writes one when a script wants a path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from offload.traces.format import Trace, TraceHeader, write_trace


def make_trace(experts, seq=None, path: str = "hand-made") -> Trace:
    """A Trace of ``experts`` [tokens, layers, top_k]; ``seq`` defaults to one sequence."""
    experts = np.asarray(experts, dtype=np.int16)
    n, layers, top_k = experts.shape
    seq = np.zeros(n, dtype=np.int32) if seq is None else np.asarray(seq, dtype=np.int32)
    pos = np.zeros(n, dtype=np.int32)
    for s in np.unique(seq):
        pos[seq == s] = np.arange((seq == s).sum())
    header = TraceHeader("hand-made", layers, int(experts.max()) + 1 if n else 1, top_k)
    return Trace(header, seq, pos, np.ones(n, dtype=np.int8), experts,
                 np.full(experts.shape, 1.0 / top_k, dtype=np.float32), np.zeros((n, layers), dtype=bool), path)


def with_experts(trace: Trace, num_experts: int) -> Trace:
    """The same tokens under a header with ``num_experts`` experts (a hand-made trace may not use them all)."""
    h = trace.header
    header = TraceHeader(h.model, h.num_layers, num_experts, h.top_k)
    return Trace(header, trace.seq, trace.pos, trace.phase, trace.experts, trace.weights, trace.imputed, trace.path)


def copy_chain(tokens: int, layers: int, num_experts: int, seed: int = 0, seqs: int = 4) -> Trace:
    """Top-1 routes where every layer repeats layer 0's expert: trivially learnable from the path."""
    rng = np.random.default_rng(seed)
    first = rng.integers(0, num_experts, size=tokens)
    experts = np.repeat(first[:, None, None], layers, axis=1)
    return with_experts(make_trace(experts, seq=np.arange(tokens) % seqs), num_experts)


def save(trace: Trace, path: Path) -> Path:
    write_trace(path, trace.header, trace.records())
    return path
