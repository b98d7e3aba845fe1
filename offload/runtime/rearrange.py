"""Request scheduling for continuous batching: which ready requests decode together, and in what
order prompts are admitted.

A decode step runs every expert that any request of the batch routes to, so the step's cost in
expert loads grows with the number of *distinct* (layer, expert) keys of the batch, not with its
size. The schedulers here choose each step's batch among the ready requests; the runtime
(``offload/runtime/batch.py``) and the trace simulation (``offload/sim/batching.py``) both call them through
the same small interface:

* ``fifo``: the first ``batch_size`` ready requests in arrival order (classic continuous batching);
* ``expert-aware``: first the requests that have waited too long (bounded unfairness), then,
  greedily, the request whose predicted route adds the fewest new keys to the batch, a key already
  in the expert cache counting less than one that must be loaded.

A request's predicted route is the route of its last step (a prev-token predictor: consecutive
tokens of one sequence reuse experts far more often than chance). Keys are ``(layer, expert)``
with ``layer`` the MoE-layer index, as in routing traces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from offload.errors import ConfigError
from offload.registry import lookup


@dataclass(eq=False)  # compared by identity: a route array has no single truth value
class Request:
    """A request as a scheduler sees it; the runtime keeps the rest (tokens, KV row) beside it."""

    id: int
    """Index in the user's input; results are returned in this order."""
    route: np.ndarray | None = None
    """[layers, top_k] experts this request used at its last step (its predicted next route); None if unknown."""
    waited: int = 0
    """Consecutive decode steps it was ready but not picked."""


def distinct_experts(routes: Sequence[np.ndarray]) -> np.ndarray:
    """Distinct experts per layer of a batch: ``routes`` are [layers, top_k] each -> [layers] counts."""
    if len(routes) == 0:
        return np.zeros(0, dtype=np.int64)
    try:
        batch = np.stack([np.asarray(r) for r in routes])  # [batch, layers, top_k]
    except ValueError:
        raise ConfigError("routes of one batch differ in shape", "every route is [layers, top_k]") from None
    if batch.ndim != 3:
        raise ConfigError(f"a route must be [layers, top_k], got shape {batch.shape[1:]}")
    per_layer = np.sort(batch.transpose(1, 0, 2).reshape(batch.shape[1], -1), axis=1)  # [layers, batch * top_k]
    return 1 + np.count_nonzero(np.diff(per_layer, axis=1), axis=1)


class Scheduler(ABC):
    """Chooses each decode step's batch among the ready requests."""

    name: ClassVar[str]
    groups_admission: ClassVar[bool] = False
    """True: prompts are admitted in :func:`admission_order` of their predicted routes (so that
    requests routing alike share the ready pool); False: in arrival order."""

    def __init__(self, batch_size: int, max_wait: int = 4, resident_weight: float = 0.5) -> None:
        for what, value, least in (("batch size", batch_size, 1), ("max wait", max_wait, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ConfigError(f"invalid {what} {value!r}", f"give a whole number >= {least}")
        if not 0.0 <= resident_weight <= 1.0:
            raise ConfigError(f"invalid resident weight {resident_weight!r}", "give a number in [0, 1]")
        self.batch_size = int(batch_size)
        self.max_wait = int(max_wait)
        self.resident_weight = float(resident_weight)
        """Cost of a key already cached against 1 for one to load (schedulers that ignore the cache ignore it)."""

    @abstractmethod
    def pick(self, ready: list[Request], resident: Collection[tuple[int, int]] = ()) -> list[Request]:
        """Choose at most batch_size of the ready requests (given in arrival order) for the next decode step."""

    def step_done(self, ready: list[Request], picked: list[Request]) -> None:
        """Update waited counters: picked -> 0, others +1."""
        chosen = {id(r) for r in picked}
        for r in ready:
            r.waited = 0 if id(r) in chosen else r.waited + 1


class FIFO(Scheduler):
    """The first batch_size ready requests in arrival order: a request, once running, runs to the end."""

    name = "fifo"

    def pick(self, ready: list[Request], resident: Collection[tuple[int, int]] = ()) -> list[Request]:
        return list(ready[: self.batch_size])


class _Keys:
    """The ready requests' predicted routes as a requests x keys 0/1 matrix, split by residency.

    Key ``layer * E + expert`` with E one more than the largest expert id seen. A cached key costs
    ``resident_weight``, any other 1; a request with no route costs ``unknown``, the mean cost of
    the known routes, wherever it is counted.
    """

    def __init__(self, ready: Sequence[Request], resident: Collection[tuple[int, int]], resident_weight: float):
        known = [i for i, r in enumerate(ready) if r.route is not None]
        self.known = np.zeros(len(ready), dtype=bool)
        self.known[known] = True
        self.weight = resident_weight
        routes = [np.asarray(ready[i].route) for i in known]
        if routes and len({r.shape for r in routes}) > 1:
            raise ConfigError("ready requests' routes differ in shape", "every route is [layers, top_k]")
        layers, experts = (routes[0].shape[0], int(max(r.max() for r in routes)) + 1) if routes else (0, 0)
        cached = np.zeros(layers * experts, dtype=bool)
        for layer, expert in resident:
            if 0 <= layer < layers and 0 <= expert < experts:
                cached[layer * experts + expert] = True
        member = np.zeros((len(ready), layers * experts), dtype=np.int32)  # [requests, keys]
        if routes:
            cols = (np.stack(routes) + (np.arange(layers) * experts)[None, :, None]).reshape(len(routes), -1)
            member[np.repeat(known, cols.shape[1]), cols.reshape(-1)] = 1
        self.cold = member[:, ~cached]  # [requests, keys not cached]
        self.warm = member[:, cached]  # [requests, keys cached]
        own = self.cold.sum(1) + self.weight * self.warm.sum(1)
        self.unknown = float(own[self.known].mean()) if routes else 0.0

    def marginal(self, cold_covered: np.ndarray, warm_covered: np.ndarray) -> np.ndarray:
        """[requests] cost each request would add to a batch covering these keys (unknown routes: the mean)."""
        # integer counts first, one multiply after: equal counts give bit-equal costs, so ties stay ties
        cold = self.cold @ (~cold_covered).astype(np.int32)
        warm = self.warm @ (~warm_covered).astype(np.int32)
        return np.where(self.known, cold + self.weight * warm, self.unknown)

    def cost(self, batch: Sequence[int]) -> float:
        """Weighted number of distinct keys of a batch (request indices)."""
        rows = list(batch)
        unknown = len(rows) - int(self.known[rows].sum())
        return (int(self.cold[rows].any(0).sum()) + self.weight * int(self.warm[rows].any(0).sum())
                + self.unknown * unknown)

    def covered(self, batch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        rows = list(batch)
        return self.cold[rows].any(0), self.warm[rows].any(0)


class ExpertAware(Scheduler):
    """Batches whose predicted routes overlap, so a step touches fewer distinct experts.

    1. Bounded unfairness: the requests that must run now to keep every wait <= ``max_wait`` are
       picked first, most-waited first. These are all requests with ``waited >= max_wait`` plus, as
       earliest-deadline-first scheduling requires, enough of the next most-waited that the later
       steps can still serve everyone in time: with slack ``max_wait - waited``, at most
       ``batch_size * d`` unpicked requests may have slack <= d. As long as no more than
       ``batch_size * (max_wait + 1)`` requests are ready at once, no request then waits more than
       ``max_wait`` steps; with more, nobody can promise that, and this degrades to oldest-first.
    2. The rest greedily: the request whose predicted route adds the fewest new keys to the batch's
       union, a cached key counting ``resident_weight``; ties go to the earlier arrival. A request
       with no route yet adds the mean of the others.
    3. A floor: if the arrival-order fill of step 2 would cost no more than the greedy one, it is
       taken instead (greedy set growth can be beaten by it on crafted routes; it is also fairer).
    """

    name = "expert-aware"
    groups_admission = True

    def pick(self, ready: list[Request], resident: Collection[tuple[int, int]] = ()) -> list[Request]:
        if len(ready) <= self.batch_size:
            return list(ready)
        forced = self.must_run(ready)
        keys = _Keys(ready, resident, self.resident_weight)
        greedy = self._greedy(keys, forced, len(ready))
        skip = set(forced)
        arrival = forced + [i for i in range(len(ready)) if i not in skip][: self.batch_size - len(forced)]
        chosen = arrival if keys.cost(arrival) <= keys.cost(greedy) else greedy
        return [ready[i] for i in sorted(chosen)]

    def must_run(self, ready: Sequence[Request]) -> list[int]:
        """Indices of the requests that must run this step to keep the max_wait promise, most-waited first."""
        waited = np.array([r.waited for r in ready], dtype=np.int64)
        order = np.argsort(-waited, kind="stable")  # most waited first, ties by arrival
        slack = np.maximum(self.max_wait - waited[order], 0)
        # the first j+1 in that order have slack <= slack[j]; all but batch_size * slack[j] of them must run now
        need = int(np.max(np.arange(1, len(ready) + 1) - self.batch_size * slack, initial=0))
        return order[: min(need, self.batch_size)].tolist()

    def _greedy(self, keys: _Keys, forced: list[int], n: int) -> list[int]:
        batch = list(forced)
        taken = np.zeros(n, dtype=bool)
        taken[batch] = True
        cold, warm = keys.covered(batch)
        while len(batch) < min(self.batch_size, n):
            cost = np.where(taken, np.inf, keys.marginal(cold, warm))
            i = int(np.argmin(cost))  # the first minimum: ties go to the earlier arrival
            batch.append(i)
            taken[i] = True
            cold |= keys.cold[i].astype(bool)
            warm |= keys.warm[i].astype(bool)
        return batch


SCHEDULERS: dict[str, type[Scheduler]] = {cls.name: cls for cls in (FIFO, ExpertAware)}


def make_scheduler(name: str, batch_size: int, max_wait: int = 4, resident_weight: float = 0.5) -> Scheduler:
    """Build a scheduler by registry name; an unknown name lists the known ones."""
    return lookup(SCHEDULERS, name, "scheduler")(batch_size, max_wait, resident_weight)


# ------------------------------------------------------------------------------------ admission


def admission_order(first_layer_routes: Sequence[np.ndarray]) -> list[int]:
    """An order to admit (prefill) prompts in, so that prompts with similar routing run together.

    ``first_layer_routes[i]`` holds prompt i's expert ids, [tokens, top_k] for one layer (the
    runtime's cheap first-MoE-layer guess) or [tokens, layers, top_k]. Each prompt becomes a
    histogram over (layer, expert) keys, and the order is a greedy nearest-neighbour chain: start
    at prompt 0, then always the unvisited prompt of highest cosine similarity to the last one
    (ties to the lower index). Admitted in this order, the requests that share the ready pool
    route alike, which gives the decode scheduler overlapping routes to choose from.
    O(prompts^2 * keys): about 0.1 s for a thousand prompts of a 32-layer, 8-expert model.
    """
    n = len(first_layer_routes)
    if n <= 2:
        return list(range(n))
    hists = _histograms([np.asarray(r) for r in first_layer_routes])  # [prompts, keys], unit rows
    order = [0]
    unvisited = np.ones(n, dtype=bool)
    unvisited[0] = False
    for _ in range(n - 1):
        similarity = np.where(unvisited, hists @ hists[order[-1]], -np.inf)
        nxt = int(np.argmax(similarity))
        order.append(nxt)
        unvisited[nxt] = False
    return order


def _histograms(routes: list[np.ndarray]) -> np.ndarray:
    """[prompts, layers * experts] key counts scaled to unit length (an empty prompt stays all zero)."""
    shapes = {r.shape[1:] for r in routes if r.size}
    if any(r.ndim not in (2, 3) for r in routes if r.size) or len(shapes) > 1:
        raise ConfigError("prompt routes must all be [tokens, top_k] or all [tokens, layers, top_k]",
                          f"got shapes {sorted({r.shape for r in routes})}")
    layers = next(iter(shapes))[0] if shapes and len(next(iter(shapes))) == 2 else 1
    experts = max((int(r.max()) for r in routes if r.size), default=0) + 1
    hists = np.zeros((len(routes), layers * experts))
    for i, r in enumerate(routes):
        if r.size:
            keys = r.reshape(r.shape[0], layers, -1) + (np.arange(layers) * experts)[None, :, None]
            hists[i] = np.bincount(keys.reshape(-1), minlength=layers * experts)
    norms = np.linalg.norm(hists, axis=1, keepdims=True)
    return hists / np.where(norms > 0, norms, 1.0)
