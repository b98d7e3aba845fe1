"""Eviction policies for the expert cache, behind one small interface and a registry by name.

A policy only orders keys; the cache owns residency, pinning and the counts. The semantics are the
ones the trace simulator (``offload.sim.simulate``) implements, so that both give identical
hit/miss counts on the same access sequence:

* ``lru``:  evict the least recently used key.
* ``fifo``: evict the oldest insertion; hits do not refresh.
* ``lfu``:  evict the key with the fewest accesses since the start (counts survive eviction),
  ties broken by least recent use.

Three more use the decode loop's structure; their keys must be the runtime's ``(layer, expert)``
tuples, and the cache tells them where decode is (``on_layer``, called before each layer step):

* ``layer-lru``: decode visits the layers in a cycle, so evict from the layer whose next visit is
  farthest away (the layer that just ran, then the one before it, ...), least recently used within
  that layer, and never one of the current layer step's experts while another key can go;
* ``predictive``: evict the key that earns its slot least, the probability that its layer's next
  visit uses it (a decayed recency-frequency value, raised by the prefetcher's predictor where it
  has scored that layer, and seeded by a request's task pattern) per layer step until that visit;
* ``layer-budget``: per-layer budgets, LRU within each, that move one slot at a time towards the
  layers whose working set outgrows their budget (a miss on a key the layer recently evicted),
  under the same total.

A demoted key (a prefetch its layer did not use) goes first in line under lru and fifo; lfu's
counts already rank it; the layer-aware policies put it first within its layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from bisect import bisect_left, insort
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, ClassVar

from offload.errors import PolicyError
from offload.registry import lookup


class EvictionPolicy(ABC):
    """Orders resident keys for eviction. The cache calls the hooks; the policy picks victims."""

    name: ClassVar[str]
    wants_scores: ClassVar[bool] = False
    """True: the prefetcher passes the predictor's probabilities to ``on_scores`` (it costs a little)."""

    @abstractmethod
    def on_access(self, key: Hashable, hit: bool) -> None:
        """A key was used (after insertion on a miss)."""

    @abstractmethod
    def on_insert(self, key: Hashable) -> None:
        """A key became resident."""

    @abstractmethod
    def on_evict(self, key: Hashable) -> None:
        """A key left the cache."""

    @abstractmethod
    def victim(self, candidates: Iterable[Hashable], incoming: Hashable | None = None) -> Hashable:
        """Pick the key to evict among ``candidates`` (resident and not pinned, never empty) to make
        room for ``incoming`` (None when the caller does not say)."""

    def on_demote(self, key: Hashable) -> None:
        """A resident key proved useless for now (a prefetch its layer did not use): evict it early.

        Recency policies put it first in line; LFU keeps its counts, which already say how useful it is.
        """

    def attach(self, num_slots: int, layers: Sequence[int] | None = None) -> None:
        """The cache's size and, when known, the MoE layers in the order decode visits them."""

    def on_layer(self, layer: int) -> None:
        """A layer step begins at ``layer`` (its accesses follow)."""

    def on_scores(self, layer: int, probs: Any) -> None:
        """The predictor's probability that ``layer``'s next step uses each expert ([num_experts] array)."""

    def on_prior(self, layer: int, probs: Any) -> None:
        """A request's task pattern (memory/patterns.py): the probability that a token of it routes to each expert
        of ``layer`` ([num_experts] array), known before its decode starts."""


class _OrderedPolicy(EvictionPolicy):
    """Evicts the first evictable key of an ordered dict; subclasses decide what moves a key."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def on_insert(self, key: Hashable) -> None:
        self._order[key] = None

    def on_evict(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def on_demote(self, key: Hashable) -> None:
        self._order.move_to_end(key, last=False)

    def victim(self, candidates: Iterable[Hashable], incoming: Hashable | None = None) -> Hashable:
        allowed = set(candidates)
        for key in self._order:
            if key in allowed:
                return key
        raise KeyError("no evictable key")


class LRU(_OrderedPolicy):
    name = "lru"

    def on_access(self, key: Hashable, hit: bool) -> None:
        self._order.move_to_end(key)


class FIFO(_OrderedPolicy):
    name = "fifo"

    def on_access(self, key: Hashable, hit: bool) -> None:
        pass


class LFU(EvictionPolicy):
    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[Hashable, int] = {}
        self._last: dict[Hashable, int] = {}
        self._clock = 0

    def on_access(self, key: Hashable, hit: bool) -> None:
        self._clock += 1
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = self._clock

    def on_insert(self, key: Hashable) -> None:
        pass

    def on_evict(self, key: Hashable) -> None:
        pass  # counts survive eviction: frequency is a property of the key, not of its residency

    def victim(self, candidates: Iterable[Hashable], incoming: Hashable | None = None) -> Hashable:
        # keys never accessed (loaded ahead of use) tie at (0, 0): the smaller key goes, whatever the candidates' order
        return min(candidates, key=lambda k: (self._count.get(k, 0), self._last.get(k, 0), k))


# ------------------------------------------------------------------------------ layer-aware policies


class LayerClock:
    """Where decode is in its cycle over the MoE layers, and how far away each layer's next visit is.

    The layers come from ``attach`` or, without it, are learned from the visits (sorted by index,
    the order a forward pass runs them); a layer not seen yet counts as ahead in that order.
    """

    def __init__(self) -> None:
        self._layers: list[int] = []
        self.current: int | None = None

    def set_layers(self, layers: Sequence[int]) -> None:
        self._layers = sorted(set(layers))

    @property
    def cycle(self) -> int:
        """Layer steps in one cycle (one token's pass), at least 1."""
        return max(len(self._layers), 1)

    def visit(self, layer: int) -> None:
        i = bisect_left(self._layers, layer)
        if i == len(self._layers) or self._layers[i] != layer:
            insort(self._layers, layer)
        self.current = layer

    def distance(self, layer: int) -> int:
        """Layer steps until ``layer`` runs next: 1 for the next layer, a whole cycle for the current one."""
        if self.current is None:
            return 1
        order = self._layers
        i = bisect_left(order, layer)
        if i == len(order) or order[i] != layer:  # not seen yet: place it where it would run
            order = [*order[:i], layer, *order[i:]]
        return (i - bisect_left(order, self.current) - 1) % len(order) + 1


class _LayerOrders:
    """Resident keys per layer in LRU order (oldest first), for the policies that evict within a layer."""

    def __init__(self) -> None:
        self.by_layer: dict[int, OrderedDict[Hashable, None]] = {}

    def touch(self, key: Hashable) -> None:
        order = self.by_layer.setdefault(key[0], OrderedDict())  # type: ignore[index]
        order[key] = None
        order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self.by_layer.get(key[0], {}).pop(key, None)  # type: ignore[index]

    def demote(self, key: Hashable) -> None:
        order = self.by_layer.get(key[0])  # type: ignore[index]
        if order is not None and key in order:
            order.move_to_end(key, last=False)

    def oldest(self, layer: int, allowed: set[Hashable], skip: set[Hashable] = frozenset()) -> Hashable | None:
        for key in self.by_layer.get(layer, ()):
            if key in allowed and key not in skip:
                return key
        return None


class LayerLRU(EvictionPolicy):
    """Farthest next layer visit first, LRU within a layer; never the current step's experts if avoidable."""

    name = "layer-lru"

    def __init__(self) -> None:
        self.clock = LayerClock()
        self._orders = _LayerOrders()
        self._step: set[Hashable] = set()  # keys used by the current layer step

    def attach(self, num_slots: int, layers: Sequence[int] | None = None) -> None:
        if layers is not None:
            self.clock.set_layers(layers)

    def on_layer(self, layer: int) -> None:
        self.clock.visit(layer)
        self._step.clear()

    def on_access(self, key: Hashable, hit: bool) -> None:
        self._orders.touch(key)
        if key[0] == self.clock.current:  # type: ignore[index]
            self._step.add(key)

    def on_insert(self, key: Hashable) -> None:
        self._orders.touch(key)

    def on_evict(self, key: Hashable) -> None:
        self._orders.remove(key)
        self._step.discard(key)

    def on_demote(self, key: Hashable) -> None:
        self._orders.demote(key)

    def victim(self, candidates: Iterable[Hashable], incoming: Hashable | None = None) -> Hashable:
        allowed = set(candidates)
        layers = sorted({k[0] for k in allowed}, key=lambda layer: -self.clock.distance(layer))  # type: ignore[index]
        for layer in layers:
            key = self._orders.oldest(layer, allowed, self._step)
            if key is not None:
                return key
        # every candidate is one of this step's experts (a cache smaller than a step): the earliest used
        return self._orders.oldest(layers[0], allowed) or next(iter(allowed))


class Predictive(EvictionPolicy):
    """Evict the key that earns its slot least: LRFU's recency-frequency with the predictor's scores.

    Holding key (l, e) until layer l runs again (``d(l)`` layer steps away: 1 for the next layer, a
    whole cycle for the current one) earns a hit with probability p, the chance that visit uses e:
    the key with the smallest ``p / d(l)``, expected hits per slot and step, goes; ties to the
    least recently used, then the larger key. p is the key's combined recency-frequency value
    (LRFU, Lee et al. 2001: each visit of layer l multiplies it by ``1 - decay`` and adds ``decay``
    if it used e), and while the predictor has scored layer l's next visit (``on_scores``, from the
    prefetcher) ``1 - (1 - p_predicted)(1 - p)``: either may be right, and a key the predictor
    overlooks stays if recency-frequency vouches for it (with the prediction alone, the keys a
    confident predictor rules out at the next layers go first and come back as misses: 6,270
    misses against 4,281 on HumanEval seq 1, markov d = 2). A prefetch its layer did not use gets
    no credit from that visit, so it goes early without a separate demotion rule.
    """

    name = "predictive"
    wants_scores = True

    def __init__(self, decay: float = 0.5, floor: float = 1e-3) -> None:
        if not 0 < decay <= 1 or not 0 < floor < 1:
            raise PolicyError(f"predictive needs 0 < decay <= 1 and 0 < floor < 1, got {decay}, {floor}")
        self.decay, self.floor = decay, floor
        self.clock = LayerClock()
        self._visits: dict[int, int] = {}
        self._crf: dict[Hashable, tuple[float, int]] = {}  # key -> (value after visit v, v)
        self._fresh: dict[int, Any] = {}  # layer -> [num_experts] probabilities for its next visit
        self._last: dict[Hashable, int] = {}
        self._tick = 0

    def attach(self, num_slots: int, layers: Sequence[int] | None = None) -> None:
        if layers is not None:
            self.clock.set_layers(layers)

    def on_layer(self, layer: int) -> None:
        self.clock.visit(layer)
        self._visits[layer] = self._visits.get(layer, 0) + 1
        self._fresh.pop(layer, None)

    def on_scores(self, layer: int, probs: Any) -> None:
        self._fresh[layer] = probs

    def on_prior(self, layer: int, probs: Any) -> None:
        """Fold the task's prior into each key's recency-frequency value as one more piece of evidence
        (``1 - (1 - prior)(1 - value)``), which then decays with the layer's visits like any other: the pattern
        speaks for an expert at the request's start, and the request's own routing takes over."""
        visit = self._visits.get(layer, 0)
        for expert, prior in enumerate(probs):
            key = (layer, expert)
            value, at = self._crf.get(key, (0.0, visit))
            value *= (1 - self.decay) ** (visit - at)
            self._crf[key] = (1 - (1 - float(prior)) * (1 - value), visit)

    def on_access(self, key: Hashable, hit: bool) -> None:
        self._tick += 1
        self._last[key] = self._tick
        visit = self._visits.get(key[0], 0)  # type: ignore[index]
        value, at = self._crf.get(key, (0.0, -1))
        if at != visit:
            self._crf[key] = (value * (1 - self.decay) ** (visit - at) + self.decay, visit)

    def on_insert(self, key: Hashable) -> None:
        pass

    def on_evict(self, key: Hashable) -> None:
        pass  # like LFU's counts, the recency-frequency value belongs to the key

    def probability(self, key: Hashable) -> float:
        """p that the next visit of the key's layer uses it (see the class docstring)."""
        layer, expert = key  # type: ignore[misc]
        value, at = self._crf.get(key, (0.0, 0))
        p = value * (1 - self.decay) ** (self._visits.get(layer, 0) - at)
        fresh = self._fresh.get(layer)
        if fresh is not None:
            p = 1 - (1 - float(fresh[expert])) * (1 - p)
        return min(max(p, self.floor), 1.0)

    def worth(self, key: Hashable) -> float:
        """Expected hits per layer step of keeping the key until its layer's next visit."""
        return self.probability(key) / self.clock.distance(key[0])  # type: ignore[index]

    def victim(self, candidates: Iterable[Hashable], incoming: Hashable | None = None) -> Hashable:
        distance: dict[int, int] = {}  # once per layer: this runs on every miss over every resident key

        def rank(key: Hashable) -> tuple[float, int, Hashable]:  # exact ties: the larger key, whatever the order
            layer = key[0]  # type: ignore[index]
            if layer not in distance:
                distance[layer] = self.clock.distance(layer)
            return -self.probability(key) / distance[layer], -self._last.get(key, 0), key

        return max(candidates, key=rank)


class LayerBudget(EvictionPolicy):
    """Per-layer budgets that adapt online; LRU within a layer.

    Budgets start as an even split of the slots over the layers. A layer that misses on a key it
    evicted recently (a hit in its ghost list of the ``budget`` keys it evicted last before this
    miss, as in ARC, Megiddo & Modha 2003) would have hit with a bigger budget: it takes one slot
    from the layer with the least such pressure (a count that decays by ``decay`` at each of that
    layer's visits). A miss evicts within
    the incoming key's layer when that layer is at or over budget, else from the layer most over
    its budget (ties: the farthest next visit).
    """

    name = "layer-budget"

    def __init__(self, decay: float = 0.9) -> None:
        if not 0 < decay < 1:
            raise PolicyError(f"layer-budget needs 0 < decay < 1, got {decay}")
        self.decay = decay
        self.clock = LayerClock()
        self._orders = _LayerOrders()
        self._slots = 0
        self.budget: dict[int, int] = {}
        self._resident: dict[int, int] = {}
        self._ghost: dict[int, OrderedDict[Hashable, None]] = {}
        self._pressure: dict[int, float] = {}
        self._from_ghost: set[Hashable] = set()

    def attach(self, num_slots: int, layers: Sequence[int] | None = None) -> None:
        self._slots = num_slots
        if layers is not None:
            self.clock.set_layers(layers)
            self._split_evenly(sorted(set(layers)))

    def _split_evenly(self, layers: list[int]) -> None:
        q, r = divmod(self._slots, max(len(layers), 1))
        self.budget = {layer: q + (i < r) for i, layer in enumerate(layers)}

    def _know(self, layer: int) -> None:
        if layer not in self.budget:  # layers learned from use (no attach): re-split over those known
            self._split_evenly(sorted([*self.budget, layer]))

    def on_layer(self, layer: int) -> None:
        self.clock.visit(layer)
        self._know(layer)
        self._pressure[layer] = self._pressure.get(layer, 0.0) * self.decay

    def on_insert(self, key: Hashable) -> None:
        layer = key[0]  # type: ignore[index]
        self._know(layer)
        self._orders.touch(key)
        self._resident[layer] = self._resident.get(layer, 0) + 1
        ghost = self._ghost.setdefault(layer, OrderedDict())
        if key in ghost:
            del ghost[key]
            self._from_ghost.add(key)
        self._trim(layer, 0)

    def on_access(self, key: Hashable, hit: bool) -> None:
        self._orders.touch(key)
        if key in self._from_ghost:
            self._from_ghost.discard(key)
            if not hit:  # a demand miss the layer's own bigger budget would have avoided
                self._grow(key[0])  # type: ignore[index]

    def _grow(self, layer: int) -> None:
        self._pressure[layer] = self._pressure.get(layer, 0.0) + 1.0
        floor = 1 if self._slots >= len(self.budget) else 0
        donors = [d for d, q in self.budget.items() if d != layer and q > floor]
        if donors:
            donor = min(donors, key=lambda d: (self._pressure.get(d, 0.0), -self.clock.distance(d)))
            self.budget[donor] -= 1
            self.budget[layer] += 1

    def on_evict(self, key: Hashable) -> None:
        layer = key[0]  # type: ignore[index]
        self._orders.remove(key)
        self._from_ghost.discard(key)
        self._resident[layer] -= 1
        self._ghost.setdefault(layer, OrderedDict())[key] = None
        self._trim(layer, 1)  # one more until the insert that made room has looked its key up

    def _trim(self, layer: int, extra: int) -> None:
        ghost = self._ghost.get(layer, {})
        while len(ghost) > max(self.budget.get(layer, 1), 1) + extra:
            ghost.popitem(last=False)  # type: ignore[attr-defined]

    def on_demote(self, key: Hashable) -> None:
        self._orders.demote(key)

    def victim(self, candidates: Iterable[Hashable], incoming: Hashable | None = None) -> Hashable:
        allowed = set(candidates)
        target = incoming[0] if incoming is not None else self.clock.current  # type: ignore[index]
        layers = {k[0] for k in allowed}  # type: ignore[index]
        if target in layers and self._resident.get(target, 0) >= self.budget.get(target, 0):
            return self._orders.oldest(target, allowed)  # type: ignore[return-value]
        over = max(layers, key=lambda layer: (self._resident.get(layer, 0) - self.budget.get(layer, 0),
                                              self.clock.distance(layer)))
        return self._orders.oldest(over, allowed)  # type: ignore[return-value]


POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (LRU, LFU, FIFO, LayerLRU, Predictive, LayerBudget)}


def make_policy(name: str, **options: Any) -> EvictionPolicy:
    """Build a policy by registry name (``options`` go to its constructor); an unknown name lists the known ones."""
    return lookup(POLICIES, name, "eviction policy", PolicyError)(**options)

