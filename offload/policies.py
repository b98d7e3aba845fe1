"""Eviction policies for the expert cache, behind one small interface and a registry by name.

A policy only orders keys; the cache owns residency, pinning and the counts. Keys are any
hashable (the runtime uses ``(layer, expert)`` tuples). The semantics are the ones the trace
simulator (``offload.sim.simulate``) implements in numba, so that both give identical hit/miss
counts on the same access sequence:

* ``lru``:  evict the least recently used key.
* ``fifo``: evict the oldest insertion; hits do not refresh.
* ``lfu``:  evict the key with the fewest accesses since the start (counts survive eviction),
  ties broken by least recent use.

A demoted key (a prefetch its layer did not use) goes first in line under lru and fifo; lfu's
counts already rank it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import ClassVar

from .errors import PolicyError
from .registry import lookup


class EvictionPolicy(ABC):
    """Orders resident keys for eviction. The cache calls the hooks; the policy picks victims."""

    name: ClassVar[str]

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
    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        """Pick the key to evict among ``candidates`` (resident and not pinned, never empty)."""

    def on_demote(self, key: Hashable) -> None:
        """A resident key proved useless for now (a prefetch its layer did not use): evict it early.

        Recency policies put it first in line; LFU keeps its counts, which already say how useful it is.
        """


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

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
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

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        return min(candidates, key=lambda k: (self._count.get(k, 0), self._last.get(k, 0)))


POLICIES: dict[str, type[EvictionPolicy]] = {cls.name: cls for cls in (LRU, LFU, FIFO)}


def make_policy(name: str) -> EvictionPolicy:
    """Build a policy by registry name; an unknown name lists the known ones."""
    return lookup(POLICIES, name, "eviction policy", PolicyError)()
