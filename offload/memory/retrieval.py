"""Task-adaptive expert retrieval at run time (PreMoe's TAER, on offload's cache): per request, and for pruning once.

* ``TaskRetrieval`` is the model's request hook (model/forward.py's RequestHook). When a request's prompt has
  routed, it picks the request's task pattern (the prompt's own routing matched against the patterns file, or
  the task the user forced), then, before decode:
  - warm start: keeps the prompt's last token's experts and loads the task's most important ones (memory/
    patterns.py's ranking across layers) into the cache while slots last, never evicting what other running
    requests use. Lossless: it only decides what is resident, so tokens never change; a warm-loaded expert's
    first demand is a hit instead of a miss;
  - hands the task's frequencies to the eviction policy (``on_prior``) and the predictor (``set_prior``).
* ``prune`` restricts every MoE layer's router to the task's ``keep`` most important experts and loads exactly
  those into a cache of that many slots, once (lossy, opt-in: the routing weight dropped is counted per layer).
  Every later access hits, so the slow tier is never read again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from offload.experts.layouts import Key
from offload.memory.cache import ExpertCache
from offload.memory.patterns import MIN_CONFIDENCE, Match, Patterns, TaskPattern
from offload.model.forward import MoEModel
from offload.stats import Stats

log = logging.getLogger(__name__)


class TaskRetrieval:
    """Match, warm start and priors at each request's start (see the module docstring)."""

    def __init__(self, patterns: Patterns, cache: ExpertCache, stats: Stats, moe_layers: Sequence[int],
                 task: str | None = None, warm: bool = True, predictor: Any = None,
                 min_confidence: float = MIN_CONFIDENCE) -> None:
        if task is not None:
            patterns.task(task)  # an unknown name fails now, not at the first request
        self.patterns, self.cache, self.stats = patterns, cache, stats
        self.moe_layers = list(moe_layers)
        self.task, self.warm, self.predictor, self.min_confidence = task, warm, predictor, min_confidence

    def match(self, routes: np.ndarray) -> Match:
        """The request's task: the forced one, or the pattern its prompt's routing matches."""
        if self.task is not None:
            return Match(self.task, 1.0, forced=True)
        return self.patterns.match(routes, self.min_confidence)

    def prefilled(self, routes: np.ndarray, running: Iterable[Key] = ()) -> Match:
        """A request's prompt routed (``routes`` [tokens, MoE layers, top_k]); prepare its decode."""
        match = self.match(routes)
        self.stats.task.record(match.task, match.confidence)
        pattern = self.patterns.task(match.task)
        if self.warm:
            last = np.asarray(routes)[-1] if len(routes) else None
            keys = [(self.moe_layers[m], e) for m, e in pattern.warm_keys(last, self.cache.num_slots)]
            self.cache.warm(keys, protect=running)
        prior = np.exp(pattern.log_frequency(self.patterns.model.top_k))  # [MoE layers, experts]
        for m, layer in enumerate(self.moe_layers):
            self.cache.policy.on_prior(layer, prior[m])
        if self.predictor is not None:
            self.predictor.set_prior(prior)
        log.debug("request matched %s (confidence %.3f)", match.task, match.confidence)
        return match


def prune(model: MoEModel, pattern: TaskPattern, keep: int) -> list[Key]:
    """Route every MoE layer among ``pattern``'s ``keep`` most important experts and load them; returns the keys.

    The cache must have a slot for each (the fit check made it so): they are loaded once, best first, and
    every later access is a hit.
    """
    retained = pattern.top(keep)  # [MoE layers, keep]
    keys = []
    for m, layer in enumerate(model.moe_layers):
        model.layers[layer].router.restrict(retained[m].tolist())
        keys += [(layer, int(e)) for e in retained[m]]
    if model.cache.num_slots < len(keys):
        raise ValueError(f"pruning keeps {len(keys)} experts, the cache has {model.cache.num_slots} slots")
    model.cache.warm(keys)
    model.cache.drain()
    model.stats.task.pruned_to = pattern.name
    return keys
