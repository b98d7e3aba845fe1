"""Warm start on routing traces: what a task pattern's loads at each request's start do to its misses.

The runtime (memory/retrieval.py) matches a request's prompt routing to a task and loads the task's most
important experts before the first decode step; :func:`warm_starts` finds, per sequence of a trace, that
moment (its first decode token) and those keys, for :func:`offload.sim.simulate.simulate_prefetch`'s ``warm``.
:func:`request_misses` then splits the misses per request: over its first decode tokens, when a cold or
foreign cache hurts most, and over the whole request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from offload.memory.patterns import Match, Patterns
from offload.sim.simulate import SCOPES, PrefetchResult
from offload.traces.format import PHASES, Trace

DECODE = PHASES.index("decode")


@dataclass(frozen=True)
class RequestMisses:
    """One sequence's demand misses: over its first ``first`` decode tokens, over its decode, over everything."""

    seq: int
    first: int
    first_misses: int
    decode_misses: int
    misses: int


def warm_starts(trace: Trace, patterns: Patterns, capacity: int, scope: str = "global",
                task: str | None = None) -> tuple[dict[int, list[int]], dict[int, Match]]:
    """{token index: keys to load before it} at each sequence's first decode token, and {seq: its match}.

    The match uses the sequence's prefill tokens (``task`` forces one, as --task does); the keys are the runtime's
    (TaskPattern.warm_keys: the last prompt token's route, then the task's ranked pairs) as simulator keys, as
    many as the cache holds (``capacity`` in all for the ``global`` scope, per layer for ``per-layer``).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    e = trace.header.num_experts
    warm: dict[int, list[int]] = {}
    matches: dict[int, Match] = {}
    for seq in dict.fromkeys(trace.seq.tolist()):
        index = np.flatnonzero(trace.seq == seq)
        decode = index[trace.phase[index] == DECODE]
        if len(decode) == 0:
            continue
        prompt = index[index < decode[0]]
        match = Match(task, 1.0, forced=True) if task else patterns.match(trace.experts[prompt])
        pattern = patterns.task(match.task)
        last = trace.experts[prompt[-1]] if len(prompt) else None
        ranked = pattern.warm_keys(last, capacity) if scope == "global" else pattern.warm_keys(last, len(
            pattern.ranking.ravel()))
        warm[int(decode[0])], matches[int(seq)] = _keys(ranked, e, capacity, scope), match
    return warm, matches


def _keys(ranked: list[tuple[int, int]], num_experts: int, capacity: int, scope: str) -> list[int]:
    """The first ``capacity`` ranked pairs (global scope) or the first ``capacity`` of each layer (per-layer)."""
    if scope == "global":
        return [m * num_experts + x for m, x in ranked[:capacity]]
    taken: dict[int, int] = {}
    keys = []
    for m, x in ranked:
        if taken.get(m, 0) < capacity:
            taken[m] = taken.get(m, 0) + 1
            keys.append(m * num_experts + x)
    return keys


def request_misses(result: PrefetchResult, trace: Trace, first: int = 16) -> list[RequestMisses]:
    """Per sequence of ``trace`` (the one ``result`` simulated), its misses in windows (see RequestMisses)."""
    out = []
    for seq in dict.fromkeys(trace.seq.tolist()):
        index = np.flatnonzero(trace.seq == seq)
        decode = index[trace.phase[index] == DECODE]
        misses = result.token_misses
        out.append(RequestMisses(int(seq), first, int(misses[decode[:first]].sum()), int(misses[decode].sum()),
                                 int(misses[index].sum())))
    return out
