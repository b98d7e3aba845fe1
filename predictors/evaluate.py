"""Driving predictors offline over routing traces: precision/recall, and prefetch in the simulator.

A trace replays exactly what the runtime's prefetcher would show a predictor, one token at a time
(batch 1): after MoE layer ``l`` of a token routes, ``predict`` sees ``RouteContext(l, path, prev)``
with ``path`` the token's experts at layers 0..l and ``prev`` the full route of the previous token
of the same sequence (rows of -1 at a sequence's first token). When the token's last layer has
routed, ``observe`` learns from it, so a predictor is always scored on tokens it has not seen.

Scores, per lookahead ``j`` (the target layer is ``l + j``) and candidate count ``k``, summed over
every (token, predicting layer l with l + j < num_layers):

* ``hits``: |top-k predicted experts at layer l+j  ∩  the top_k experts the token used there|;
* ``precision@k = hits / (k * predictions)``: the share of prefetched experts that were used;
* ``recall@k = hits / (top_k * predictions)``: the share of used experts that were prefetched.

At ``k = top_k`` the two are equal; at ``k = 2 * top_k`` precision is at most 1/2 and recall is
the figure that matters (a prefetcher with twice the transfers). Every prediction counts, also the
uninformed ones (prev-token at a sequence's start proposes experts 0..k-1), since a prefetcher
acting on it would move those bytes.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from offload.errors import ConfigError
from offload.sim.simulate import Proposal
from offload.stats import ratio
from offload.traces.format import Trace, read_trace

from .base import (
    Predictor,
    RouteContext,
    check_shape,
    next_token_context,
    next_token_layers,
    prev_routes,
    shape_of,
    step_probabilities,
    top_candidates,
)

if TYPE_CHECKING:  # the simulator pulls in numba, which the runtime's predictors do not need
    from offload.sim.simulate import Proposal, Step


def select_seqs(trace: Trace, seqs: Iterable[int]) -> Trace:
    """The tokens of the sequences ``seqs``, in the trace's order; an unknown sequence is a ConfigError."""
    wanted = sorted(set(int(s) for s in seqs))
    present = set(np.unique(trace.seq).tolist())
    missing = [s for s in wanted if s not in present]
    if missing or not wanted:
        raise ConfigError(f"{trace.path or 'trace'}: no sequence {missing[0] if missing else '(none asked)'}",
                          f"its sequences are {min(present)}..{max(present)}" if present else "the trace is empty")
    keep = np.isin(trace.seq, wanted)
    return Trace(trace.header, trace.seq[keep], trace.pos[keep], trace.phase[keep], trace.experts[keep],
                 trace.weights[keep], trace.imputed[keep], trace.path)


def parse_seqs(spec: str) -> tuple[int, ...]:
    """``"0-19,25"`` -> (0, ..., 19, 25)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        if not (lo.isdigit() and (hi.isdigit() or not hi)) or (hi and int(hi) < int(lo)):
            raise ConfigError(f"bad sequence list {spec!r}", "write ids and ranges: 0-19,25")
        out += range(int(lo), int(hi or lo) + 1)
    return tuple(out)


def read_trace_spec(spec: str) -> Trace:
    """``PATH`` or ``PATH@SEQS`` (e.g. ``he.jsonl.gz@0-9,12``): a trace, or only those of its sequences."""
    path, sep, seqs = spec.rpartition("@")
    if not sep or not re.fullmatch(r"[\d,\-]+", seqs):
        return read_trace(spec)
    return dataclasses.replace(select_seqs(read_trace(path), parse_seqs(seqs)), path=spec)


# ------------------------------------------------------------------------------------ scoring


@dataclass
class HitCounts:
    """Sums for one (lookahead, k): see the module docstring for the definitions."""

    lookahead: int
    k: int
    top_k: int
    predictions: int = 0
    hits: int = 0

    @property
    def precision(self) -> float:
        return ratio(self.hits, self.k * self.predictions)

    @property
    def recall(self) -> float:
        return ratio(self.hits, self.top_k * self.predictions)


@dataclass
class TraceScore:
    """A predictor's precision/recall on one trace, and what its calls cost."""

    predictor: str
    tokens: int
    counts: list[HitCounts]
    predict_calls: int = 0
    predict_s: float = 0.0
    observe_calls: int = 0
    observe_s: float = 0.0
    per_layer_hits: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    """(lookahead, k) -> hits per target layer [num_layers] (zeros where no prediction targets it)."""

    @property
    def predict_us(self) -> float:
        """Mean wall time of one ``predict`` call (one token, all lookaheads), microseconds."""
        return ratio(1e6 * self.predict_s, self.predict_calls)

    @property
    def observe_us(self) -> float:
        return ratio(1e6 * self.observe_s, self.observe_calls)

    def at(self, lookahead: int, k: int) -> HitCounts:
        return next(c for c in self.counts if c.lookahead == lookahead and c.k == k)


def score_trace(predictor: Predictor, trace: Trace, lookahead: int, ks: Sequence[int] | None = None,
                online: bool = True) -> TraceScore:
    """Run ``predictor`` over ``trace`` token by token; precision/recall at each k for lookaheads 1..lookahead.

    ``ks`` defaults to (top_k, 2 * top_k) capped at num_experts. With ``online`` the predictor
    observes each token once its route is complete (as in the runtime).
    """
    check_shape(predictor, trace)
    shape = predictor.shape
    if lookahead < 1:
        raise ConfigError(f"lookahead must be >= 1 layer, got {lookahead}")
    ks = tuple(ks) if ks else tuple(dict.fromkeys((shape.top_k, min(2 * shape.top_k, shape.num_experts))))
    if any(not 1 <= k <= shape.num_experts for k in ks):
        raise ConfigError(f"candidate counts {ks} must lie in 1..{shape.num_experts}")
    kmax = max(ks)
    counts = {(j, k): HitCounts(j, k, shape.top_k) for j in range(1, lookahead + 1) for k in ks}
    per_layer = {key: np.zeros(shape.num_layers, dtype=np.int64) for key in counts}
    result = TraceScore(predictor.name, len(trace), list(counts.values()), per_layer_hits=per_layer)
    experts = trace.experts.astype(np.int64)
    prev = prev_routes(trace.seq, experts)
    # used[t, l, e]: token t used expert e at layer l
    used = np.zeros((len(trace), shape.num_layers, shape.num_experts), dtype=bool)
    np.put_along_axis(used, experts, True, axis=2)
    clock = time.perf_counter
    for t in range(len(trace)):
        prev_t = prev[t:t + 1]
        for layer in range(shape.num_layers - 1):
            ctx = RouteContext(layer, experts[t:t + 1, :layer + 1], prev_t)
            start = clock()
            scores = predictor.predict(ctx, lookahead)  # [d, 1, experts]
            result.predict_s += clock() - start
            result.predict_calls += 1
            picks = top_candidates(scores[:, 0], kmax)  # [d, kmax]
            for j in range(1, scores.shape[0] + 1):
                target = layer + j
                hit = used[t, target][picks[j - 1]]  # [kmax] bool, best candidate first
                for k in ks:
                    c = counts[(j, k)]
                    n = int(hit[:k].sum())
                    c.predictions += 1
                    c.hits += n
                    per_layer[(j, k)][target] += n
        if online:
            start = clock()
            predictor.observe(experts[t:t + 1], prev_t)
            result.observe_s += clock() - start
            result.observe_calls += 1
    return result


def time_predict(predictor: Predictor, trace: Trace, lookahead: int, tokens: int = 1, calls: int = 300,
                 repeats: int = 5) -> float:
    """Microseconds per ``predict`` call on contexts of ``tokens`` consecutive tokens of ``trace``, all layers in turn.

    The best of ``repeats`` means over ``calls`` calls, so that other work on the machine inflates it
    as little as possible. Contexts are built beforehand; nothing is observed.
    """
    check_shape(predictor, trace)
    experts = trace.experts.astype(np.int64)
    prev = prev_routes(trace.seq, experts)
    L, n = predictor.shape.num_layers, max(len(trace) - tokens, 1)
    contexts = []
    for i in range(calls):
        t, layer = (i * tokens) % n, i % max(L - 1, 1)
        contexts.append(RouteContext(layer, experts[t:t + tokens, :layer + 1], prev[t:t + tokens]))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for ctx in contexts:
            predictor.predict(ctx, lookahead)
        best = min(best, (time.perf_counter() - start) / calls)
    return 1e6 * best


# ------------------------------------------------------------------------------------ simulator


class PrefetchAdapter:
    """A Predictor as ``simulate_prefetch``'s callable: after each layer step, the keys to prefetch.

    Proposes the ``k`` best experts (default top_k) of each of the next ``lookahead`` layers,
    nearest layer first; with ``across_tokens`` (and a predictor that can) the layers past the
    last one are the next token's first layers, scored from the current token's route as its
    ``prev`` (:func:`~predictors.base.next_token_context`), as the runtime's prefetcher does.
    ``seq`` names each token's sequence (default: one sequence) so that ``prev`` is the predecessor
    in the same sequence, and the next token is the trace's next; the simulator's ``Step.past``
    supplies the routes, so the adapter never sees a route before it happens. With ``online`` the
    predictor observes each token after its last layer. ``calls`` and ``seconds`` count the
    predict calls and their time.
    """

    def __init__(self, predictor: Predictor, lookahead: int = 1, k: int | None = None,
                 seq: np.ndarray | None = None, online: bool = True, across_tokens: bool = True) -> None:
        if lookahead < 1:
            raise ConfigError(f"lookahead must be >= 1 layer, got {lookahead}")
        self.predictor = predictor
        self.lookahead = lookahead
        self.k = k or predictor.shape.top_k
        if not 1 <= self.k <= predictor.shape.num_experts:
            raise ConfigError(f"prefetch candidates {self.k} must lie in 1..{predictor.shape.num_experts}")
        self.seq = None if seq is None else np.asarray(seq)
        self.online = online
        self.across_tokens = across_tokens and predictor.across_tokens
        self.calls = 0
        self.seconds = 0.0
        self._token = -1
        self._last: dict[int, int] = {}  # sequence -> index of its latest token
        self._prev = np.full((1, predictor.shape.num_layers, predictor.shape.top_k), -1, dtype=np.int64)

    def _seq(self, token: int) -> int:
        return 0 if self.seq is None else int(self.seq[token])

    def _start_token(self, step: Step) -> None:
        before = self._last.get(self._seq(step.token))
        self._prev = np.full_like(self._prev, -1)
        if before is not None:
            self._prev[0] = step.past[before]
        self._last[self._seq(step.token)] = step.token
        self._token = step.token

    def _next_prev(self, step: Step) -> np.ndarray | None:
        """The next token's ``prev`` [1, layers, top_k], or None at the end of the trace."""
        nxt = step.token + 1
        if self.seq is not None and nxt >= len(self.seq):
            return None
        prev = np.full_like(self._prev, -1)
        if self._seq(nxt) == self._seq(step.token):  # this token, as far as it has routed
            prev[0, :step.layer + 1] = step.current
        elif self._seq(nxt) in self._last:
            prev[0] = step.past[self._last[self._seq(nxt)]]
        return prev

    def _score(self, ctx: RouteContext, lookahead: int) -> np.ndarray:
        start = time.perf_counter()
        scores = self.predictor.predict(ctx, lookahead)  # [d, 1, experts]
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return scores

    def _propose(self, step: Step, first: int, scores: np.ndarray, keys: list[int], probs: dict) -> None:
        """Add the picks (and probabilities) of ``scores`` [d, 1, experts] for layers first, first + 1, ..."""
        picks = top_candidates(scores[:, 0], self.k)  # [d, k]
        keys += [step.key(first + j, int(e)) for j in range(picks.shape[0]) for e in picks[j]]
        # what the runtime's prefetcher hands a prediction-aware policy: per-layer probabilities
        probs.update({first + j: step_probabilities(self.predictor, scores[j]) for j in range(len(scores))})

    def __call__(self, step: Step) -> Proposal:
        if step.token != self._token:
            self._start_token(step)
        layers = self.predictor.shape.num_layers
        path = step.current[None].astype(np.int64)  # [1, layer + 1, top_k]
        keys: list[int] = []
        probs: dict[int, np.ndarray] = {}
        if step.layer < layers - 1:
            self._propose(step, step.layer + 1, self._score(RouteContext(step.layer, path, self._prev),
                                                            self.lookahead), keys, probs)
        ahead = next_token_layers(step.layer, self.lookahead, layers) if self.across_tokens else 0
        prev = self._next_prev(step) if ahead else None
        if prev is not None:
            self._propose(step, 0, self._score(next_token_context(prev), ahead), keys, probs)
        if step.layer == layers - 1 and self.online:
            self.predictor.observe(path, self._prev)
        return Proposal(keys, probs)


__all__ = ["HitCounts", "PrefetchAdapter", "TraceScore", "check_shape", "parse_seqs", "prev_routes", "read_trace_spec",
           "score_trace", "select_seqs", "shape_of", "time_predict"]
