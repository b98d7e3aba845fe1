"""The prefetcher: after a MoE layer routes, ask the predictor for the next layers and start their loads.

It keeps what the predictors' interface promises them (the route so far of every token in the
step, the previous token's route of each sequence, the residual stream), turns scores into
prefetches under a budget, and keeps the prediction counts (precision and recall per lookahead).
Prefetching only changes when bytes move: the cache's hit/miss accounting and the computed values
are those of demand accesses, so output tokens never depend on the predictor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from offload.memory.cache import ExpertCache
from offload.stats import PredictionStats, Stats
from predictors import (
    MoEShape,
    Predictor,
    RouteContext,
    next_token_context,
    next_token_layers,
    step_probabilities,
    top_candidates,
)


@dataclass(frozen=True)
class PrefetchConfig:
    """How far ahead to look and how much of the cache prefetches may hold."""

    lookahead: int = 1         # predict layers l+1 .. l+lookahead
    budget_slots: int = 1      # most experts prefetched and not yet used at any time
    candidates: int = 0        # experts per token per predicted layer (0: the model's top-k)
    across_tokens: bool = True  # past the last layer, predict the next token's first layers (if the predictor can)

    def __post_init__(self) -> None:
        if self.lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {self.lookahead}")
        if self.budget_slots < 0 or self.candidates < 0:
            raise ValueError("prefetch budget and candidates must be >= 0")


class Prefetcher:
    """Drives one predictor over a model's forward steps and issues prefetches into the cache."""

    def __init__(self, predictor: Predictor, cache: ExpertCache, stats: Stats, moe_layers: list[int],
                 config: PrefetchConfig) -> None:
        self.predictor = predictor
        self.cache = cache
        self.stats = stats
        self.moe_layers = moe_layers                       # model layer index of each MoE layer
        self.moe_index = {layer: m for m, layer in enumerate(moe_layers)}
        self.shape: MoEShape = predictor.shape
        self.config = config
        self.k = config.candidates or self.shape.top_k
        # [slots, layers, top_k]: the last token's route of the sequence in each KV slot (-1: none yet)
        self._prev_by_slot = np.full((0, self.shape.num_layers, self.shape.top_k), -1, dtype=np.int64)
        self._pending: dict[int, list[set[int]]] = {}      # MoE layer -> predicted sets (one per lookahead)

    # -- step boundaries (called by the model's forward) -----------------------------------
    def begin_step(self, valid: torch.Tensor, slots: torch.Tensor, fresh: torch.Tensor) -> None:
        """A forward step begins over ``valid`` [batch, seq] tokens.

        ``slots`` [batch] names each row's sequence across steps (a KV row), ``fresh`` [batch] marks
        rows whose sequence starts now, so their history is forgotten.
        """
        slot_ids = slots.numpy(force=True)
        size = int(slot_ids.max()) + 1 if len(slot_ids) else 0
        if self._prev_by_slot.shape[0] < size:
            grown = np.full((size, self.shape.num_layers, self.shape.top_k), -1, dtype=np.int64)
            grown[: self._prev_by_slot.shape[0]] = self._prev_by_slot
            self._prev_by_slot = grown
        self._prev_by_slot[slot_ids[fresh.numpy(force=True)]] = -1
        rows = np.nonzero(valid.numpy(force=True))[0]       # row of each flat valid token, row-major
        first = np.ones(len(rows), dtype=bool)
        first[1:] = rows[1:] != rows[:-1]
        # A token's predecessor is known only if it ran in an earlier step (decode): the first token
        # of its row in this step. Later prompt tokens' predecessors are routed alongside them.
        self._slots = slot_ids[rows]
        self._prev = np.where(first[:, None, None], self._prev_by_slot[self._slots], -1)
        self._rows, self._first = rows, first
        self._last = np.ones(len(rows), dtype=bool)  # each row's last token: the next step continues from it
        self._last[:-1] = rows[1:] != rows[:-1]
        self._path = np.full((len(rows), self.shape.num_layers, self.shape.top_k), -1, dtype=np.int64)
        self._pending.clear()

    def end_step(self) -> None:
        """The step's routes are complete: remember each row's last token and let the predictor learn."""
        if self._path.shape[0] == 0:
            return
        start = time.perf_counter()
        last = self._last
        self._prev_by_slot[self._slots[last]] = self._path[last]
        true_prev = self._prev.copy()  # now every predecessor's route is known
        true_prev[1:][~self._first[1:]] = self._path[:-1][~self._first[1:]]
        self.predictor.observe(self._path, true_prev)
        self.stats.predictor_time_s += time.perf_counter() - start

    # -- after each MoE layer routes -------------------------------------------------------
    def after_route(self, layer: int, experts: torch.Tensor, hidden: torch.Tensor) -> None:
        """``experts`` [tokens, top_k] just routed at model layer ``layer``; ``hidden`` [tokens, hidden]."""
        start = time.perf_counter()
        m = self.moe_index[layer]
        routed = experts.numpy(force=True)
        self._path[:, m] = routed
        used = set(routed.ravel().tolist())
        self._score(m, used)
        self.cache.expire_prefetches(layer, used)  # what this layer does not use was a wrong guess
        wanted: list[tuple[int, int]] = []  # (model layer, expert), nearest layer first, best first
        if m + 1 < self.shape.num_layers:
            ctx = RouteContext(m, self._path[:, : m + 1], self._prev, hidden if self.predictor.needs_hidden else None)
            wanted += self._wanted(m + 1, self.predictor.predict(ctx, self.config.lookahead), score=True)
        across = self.config.across_tokens and self.predictor.across_tokens
        ahead = next_token_layers(m, self.config.lookahead, self.shape.num_layers) if across else 0
        if ahead:  # past the last layer: the next token's first layers, from this token's route as its prev
            wanted += self._wanted(0, self.predictor.predict(next_token_context(self._path[self._last]), ahead))
        # Room is never made by evicting what this layer uses or an expert predicted ahead of this one
        # (nearer, or likelier): evicting it for a less likely one would only move the miss. Experts
        # predicted after it may go, so a small cache still takes the likeliest.
        protect = {(layer, e) for e in used}
        waited = self.cache.evict_wait_s
        for key in wanted:
            if self.cache.prefetched >= self.config.budget_slots:
                break
            protect.add(key)
            self.cache.prefetch(key, protect)
        # Waiting for a victim's load to land is stall time (the cache counts it), not predictor work.
        self.stats.predictor_time_s += time.perf_counter() - start - (self.cache.evict_wait_s - waited)

    def _wanted(self, first: int, scores: np.ndarray, score: bool = False) -> list[tuple[int, int]]:
        """The keys to prefetch from ``scores`` [d, tokens, experts] of MoE layers first, first + 1, ...;
        ``score``: remember them for the precision/recall counts (within the token only)."""
        wanted: list[tuple[int, int]] = []
        for j in range(scores.shape[0]):
            predicted = self._rank(top_candidates(scores[j], self.k), scores[j])
            if score:
                self._pending.setdefault(first + j, []).append(set(predicted))
            wanted += [(self.moe_layers[first + j], e) for e in predicted]
            if self.cache.policy.wants_scores:  # a prediction-aware policy ranks residents by these
                self.cache.predicted(self.moe_layers[first + j], step_probabilities(self.predictor, scores[j]))
        return wanted

    @staticmethod
    def _rank(picks: np.ndarray, scores: np.ndarray) -> list[int]:
        """Distinct candidates ([tokens, k] picks), most-proposed first (ties: higher summed score, then lower id)."""
        if picks.shape[0] == 1:  # one token (decode at batch 1): its picks are already best first
            return picks[0].tolist()
        ids, counts = np.unique(picks, return_counts=True)
        order = np.lexsort((ids, -scores[:, ids].sum(axis=0), -counts))
        return ids[order].tolist()

    def _score(self, m: int, actual: set[int]) -> None:
        """Compare what was predicted for MoE layer ``m`` (at each lookahead) with what it used."""
        for j, predicted in enumerate(reversed(self._pending.pop(m, []))):
            # predictions for m were appended nearest-first in time order: the last one is lookahead 1
            stats = self.stats.prediction.setdefault(j + 1, PredictionStats())
            stats.predicted += len(predicted)
            stats.actual += len(actual)
            stats.correct += len(predicted & actual)
