"""Predictors from routing history alone: the previous token's route, and inter-layer expert affinity.

Neither needs hidden states, so both run on traces and in the runtime alike, at a cost of
microseconds per call.

* ``prev-token``: a token tends to reuse the experts its predecessor chose at the same layer
  (temporal locality; Eliseev & Mazur 2023 measure it on Mixtral).
* ``markov``: ExFlow's inter-layer affinity (Yao et al., 2024: a token that picks expert a at layer
  l picks from a small set at layer l+1), counted from traces and updated online, combined with the
  previous token's choice at the target layer in a weighted naive-Bayes score (see :class:`Markov`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from offload.errors import ConfigError

from .base import MoEShape, Predictor, RouteContext, check_shape, prev_routes, register

if TYPE_CHECKING:  # the trace format is analysis code: read only when a trace is given (fit)
    from offload.traces.format import Trace


def target_layers(shape: MoEShape, ctx: RouteContext, lookahead: int) -> range:
    """The MoE layers a predict call scores: layer+1 .. layer+lookahead, cut at the last layer."""
    if lookahead < 1:
        raise ConfigError(f"lookahead must be >= 1 layer, got {lookahead}")
    return range(ctx.layer + 1, min(ctx.layer + 1 + lookahead, shape.num_layers))


def prev_token_scores(shape: MoEShape, ctx: RouteContext, targets: range) -> np.ndarray:
    """[len(targets), tokens, experts]: top_k - rank for the experts ``prev`` used at each target, else 0."""
    ids = ctx.prev[:, targets.start:targets.stop].astype(np.int64)  # [tokens, d, top_k], -1 = unknown
    rank_value = np.arange(shape.top_k, 0, -1, dtype=np.float32)  # top-1 scores highest
    scores = np.zeros((ids.shape[0], ids.shape[1], shape.num_experts + 1), dtype=np.float32)
    # unknown ids land in a spare column that is dropped
    np.put_along_axis(scores, np.where(ids < 0, shape.num_experts, ids),
                      np.broadcast_to(rank_value, ids.shape), axis=2)
    return scores[..., :-1].transpose(1, 0, 2).copy()


@register
class PrevToken(Predictor):
    """The experts the previous token of the same sequence used at each target layer (top-1 first).

    Tokens with no known predecessor get all-zero scores (no information).
    """

    name = "prev-token"

    def predict(self, ctx: RouteContext, lookahead: int) -> np.ndarray:
        return prev_token_scores(self.shape, ctx, target_layers(self.shape, ctx, lookahead))


def _accumulate(table: np.ndarray, flat_index: np.ndarray) -> None:
    """``table.flat[i] += 1`` for every i in ``flat_index`` (repeats add up)."""
    flat_index = flat_index.ravel()
    if flat_index.size * 64 < table.size:  # few updates to a big table (one decode token): sort them
        keys, counts = np.unique(flat_index, return_counts=True)
        table.reshape(-1)[keys] += counts
    else:  # many updates (fitting a trace): one pass over the table
        table += np.bincount(flat_index, minlength=table.size).reshape(table.shape)


@register
class Markov(Predictor):
    """Inter-layer and token-to-token expert affinity from counts, combined by weighted naive Bayes.

    Counts (all of observed tokens' routes, ``top_k`` experts per layer):

    * ``pair[s, d-1, a, b]``: tokens that used a at layer s and b at layer s+d (d = 1..horizon),
      direct l -> l+d counts rather than chained one-layer steps, so lookahead d costs no more
      than d = 1 and does not compound errors;
    * ``temporal[l, a, b]``: tokens that used b at layer l whose predecessor used a there;
    * ``unigram[l, b]`` and ``tokens``: how often b is used at l, out of how many tokens.

    Each count gives a smoothed probability that b is among a token's experts,
    ``p(b | a) = (count(a, b) + alpha * top_k / E) / (count(a) + alpha)`` (shrunk towards the
    uniform top_k / E). The score of expert b at target layer T is

        log p_T(b) + w_path * sum over features (s, a) of [log p(b at T | a at s) - log p_T(b)]
                   + w_prev * sum over a in prev[T]   of [log p(b at T | prev a at T) - log p_T(b)]

    with path features the token's experts at the ``context`` latest routed layers s whose distance
    T - s is at most ``horizon``. With both weights 1 this is naive Bayes; a missing feature (no
    predecessor, or a target beyond the horizon) adds nothing, leaving the other features and the
    prior. ``fit(trace)`` adds a trace's counts; ``observe`` adds each finished token's (online).
    """

    name = "markov"

    def __init__(self, shape: MoEShape, trace: str | Path | Trace | None = None, horizon: int = 4,
                 context: int = 3, alpha: float = 1.0, path_weight: float = 1.0, prev_weight: float = 1.0) -> None:
        super().__init__(shape)
        if horizon < 1 or context < 1 or alpha <= 0 or path_weight < 0 or prev_weight < 0:
            raise ConfigError(f"bad markov options: horizon={horizon}, context={context} (both >= 1), "
                              f"alpha={alpha} (> 0), weights {path_weight}, {prev_weight} (>= 0)")
        L, E = shape.num_layers, shape.num_experts
        self.horizon = min(horizon, max(L - 1, 1))
        self.context = context
        self.alpha = alpha
        self.path_weight = path_weight
        self.prev_weight = prev_weight
        self.pair = np.zeros((L, self.horizon, E, E))
        self.temporal = np.zeros((L, E, E))
        self.unigram = np.zeros((L, E))
        self.tokens = 0
        if trace is not None:
            self.fit(trace)

    # -- learning -------------------------------------------------------------------------
    def fit(self, trace: str | Path | Trace) -> Markov:
        """Add the counts of every token of a trace (a path or a read :class:`Trace`)."""
        if isinstance(trace, (str, Path)):
            from offload.traces.format import read_trace

            trace = read_trace(trace)
        check_shape(self, trace)
        experts = trace.experts.astype(np.int64)
        self.observe(experts, prev_routes(trace.seq, experts))
        return self

    def observe(self, experts: np.ndarray, prev: np.ndarray) -> None:
        experts = np.asarray(experts, dtype=np.int64)  # [tokens, layers, top_k]
        prev = np.asarray(prev, dtype=np.int64)
        n, L, K = experts.shape
        if n == 0:
            return
        E, H = self.shape.num_experts, self.horizon
        layer = np.arange(L)[None, :, None]
        _accumulate(self.unigram, layer * E + experts)
        self.tokens += n
        # every (a at s, b at s+d) of a token, as flat indices into pair: [tokens, L-d, K, K] per d
        _accumulate(self.pair, np.concatenate([
            (((layer[:, :L - d, :, None] * H + d - 1) * E + experts[:, :L - d, :, None]) * E
             + experts[:, d:, None, :]).ravel() for d in range(1, H + 1)]))
        t_idx, l_idx = np.nonzero((prev >= 0).all(axis=2))  # (token, layer) with a known predecessor
        _accumulate(self.temporal, (l_idx[:, None, None] * E + prev[t_idx, l_idx][:, :, None]) * E
                    + experts[t_idx, l_idx][:, None, :])

    # -- scoring --------------------------------------------------------------------------
    def _smooth(self, counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
        """log of the smoothed share of ``totals`` events that used each expert (last axis)."""
        prior = self.alpha * self.shape.top_k / self.shape.num_experts
        return np.log((counts + prior) / (totals[..., None] + self.alpha))

    def features(self, ctx: RouteContext, lookahead: int) -> np.ndarray:
        """The score's terms, [d, tokens, experts, 2 + context]: the log prior, the prev-token log ratio
        (summed over prev's experts), then the path log ratios of layers l, l-1, ... (summed over each
        layer's experts; zeros beyond the first layer or the horizon). ``predict`` weighs and adds them."""
        # One gather per feature kind over all targets at once: this runs after every layer of every token.
        tg = np.asarray(target_layers(self.shape, ctx, lookahead))  # [d] target layers
        src = np.arange(ctx.layer, max(0, ctx.layer - self.context + 1) - 1, -1)  # [c] context layers, latest first
        path = np.asarray(ctx.path, dtype=np.int64)[:, src]  # [T, c, K]
        prev = np.asarray(ctx.prev, dtype=np.int64)[:, tg].transpose(1, 0, 2)  # [d, T, K]
        log_prior = self._smooth(self.unigram[tg], np.asarray(float(self.tokens)))[:, None, None, None]  # [d,1,1,1,E]
        out = np.zeros((len(tg), ctx.tokens, self.shape.num_experts, 2 + self.context))
        # the first term is the prior: the task's own frequencies when a request's pattern is set (the path and
        # prev ratios stay relative to the counts' unigram, which is what they were measured against)
        out[..., 0] = np.log(self.prior[tg])[:, None, :] if self.prior is not None else log_prior[:, 0, 0]
        known = prev >= 0
        safe = np.where(known, prev, 0)
        counts = self.temporal[tg[:, None, None], safe]  # [d, T, K, E]
        totals = self.temporal[tg].sum(axis=2)[np.arange(len(tg))[:, None, None], safe] / self.shape.top_k
        out[..., 1] = ((self._smooth(counts, totals) - log_prior[:, 0]) * known[..., None]).sum(axis=2)
        dist = tg[:, None] - src[None, :]  # [d, c]
        near = (dist <= self.horizon)[:, None, :, None, None]  # [d, 1, c, 1, 1]
        if near.any():
            counts = self.pair[src[None, None, :, None], np.minimum(dist, self.horizon)[:, None, :, None] - 1,
                               path[None]]  # [d, T, c, K, E]
            ratio = self._smooth(counts, self.unigram[src[None, :, None], path]) - log_prior
            out[..., 2:2 + len(src)] = (ratio * near).sum(axis=3).transpose(0, 1, 3, 2)
        return out

    def predict(self, ctx: RouteContext, lookahead: int) -> np.ndarray:
        f = self.features(ctx, lookahead)
        weights = np.array([1.0, self.prev_weight] + [self.path_weight] * self.context)
        return (f @ weights).astype(np.float32)
