"""Token-level perplexity of a text with the runtime, as llama.cpp's llama-perplexity and transformers'
fixed-length-model recipe compute it: windows of ``context`` tokens moved ``stride`` tokens at a
time, each token scored once, with as much preceding context as its window holds.

This is how a user sees what a format costs: the same text, the same budget, float32 against int8
against int4, and the expert cache never changes the numbers (outputs do not depend on the budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from offload.errors import ConfigError


@dataclass(frozen=True)
class PerplexityResult:
    """``nll`` is the summed negative log-likelihood (nats) of the ``tokens`` scored tokens."""

    perplexity: float
    tokens: int
    nll: float
    context: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window over ``n`` tokens: tokens [end - scored, end) are scored in
    window [begin, end), each at most once. A token is scored only with at least one token of its
    window before it, so with ``stride == context`` (no overlap) each window's first token is not
    scored, as in transformers' recipe."""
    if context < 2 or not 1 <= stride <= context:
        raise ConfigError(f"context {context} and stride {stride} do not make windows",
                          "use context >= 2 and 1 <= stride <= context")
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        start = max(prev_end, begin + 1)  # a token needs one before it in its window
        if end > start:
            out.append((begin, end, end - start))
            prev_end = end
        if end == n:
            break
    return out


@torch.inference_mode()
def perplexity(logits_of: Callable[[torch.Tensor], torch.Tensor], ids: list[int], context: int = 512,
               stride: int = 512, progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity of ``ids`` under ``logits_of`` ([1, seq] ids -> [1, seq, vocab] logits, no cache)."""
    if len(ids) < 2:
        raise ConfigError(f"the text encodes to {len(ids)} token(s)", "perplexity needs at least 2 tokens")
    spans = windows(len(ids), context, stride)
    nll, scored = 0.0, 0
    for i, (begin, end, count) in enumerate(spans):
        window = torch.tensor([ids[begin:end]])
        logits = logits_of(window)[0, -count - 1 : -1].float()  # the positions that predict the scored tokens
        targets = window[0, -count:].to(logits.device)
        nll += float(F.cross_entropy(logits, targets, reduction="sum"))
        scored += count
        if progress:
            progress(i + 1, len(spans))
    return PerplexityResult(math.exp(nll / scored), scored, nll, context, stride)
