"""Slow, obviously-correct oracles that the fast code is checked against.

Each section holds the oracles of one part of the project; nothing here imports the project, so
an oracle cannot share a bug with the code it checks. ``from tests import reference`` with the
repository root on ``sys.path`` (pytest puts it there; scripts/common.py does for the scripts).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache

# ================================================================================================
# Simulator oracles (checked against offload/simulate.py)
#
# One cache object per partition; ``access(key) -> (hit, evicted key or None)``. A miss always
# inserts. Keys are ints; ``i`` is the access's index in the whole stream (Belady looks ahead
# from it, LFU uses it as the time of last use).
# ================================================================================================


class RefLRU:
    """LRU: an OrderedDict kept in order of last use, oldest first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: OrderedDict[int, None] = OrderedDict()

    def access(self, key: int, i: int) -> tuple[bool, int | None]:
        if key in self.keys:
            self.keys.move_to_end(key)
            return True, None
        evicted = self.keys.popitem(last=False)[0] if len(self.keys) == self.capacity else None
        self.keys[key] = None
        return False, evicted


class RefFIFO:
    """FIFO: a deque in order of insertion; a hit changes nothing."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.queue: deque[int] = deque()

    def access(self, key: int, i: int) -> tuple[bool, int | None]:
        if key in self.queue:
            return True, None
        evicted = self.queue.popleft() if len(self.queue) == self.capacity else None
        self.queue.append(key)
        return False, evicted


class RefLFU:
    """LFU: fewest accesses since the trace start (kept across evictions), ties by least recent use."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.resident: set[int] = set()
        self.count: dict[int, int] = {}
        self.last: dict[int, int] = {}

    def access(self, key: int, i: int) -> tuple[bool, int | None]:
        self.count[key] = self.count.get(key, 0) + 1
        self.last[key] = i
        if key in self.resident:
            return True, None
        evicted = None
        if len(self.resident) == self.capacity:
            evicted = min(self.resident, key=lambda k: (self.count[k], self.last[k]))
            self.resident.remove(evicted)
        self.resident.add(key)
        return False, evicted


class RefBelady:
    """Belady's MIN: evict the key whose next use is farthest, found by scanning the future."""

    def __init__(self, capacity: int, stream: Sequence[int]) -> None:
        self.capacity = capacity
        self.stream = stream
        self.resident: set[int] = set()

    def _next_use(self, key: int, i: int) -> float:
        for j in range(i + 1, len(self.stream)):
            if self.stream[j] == key:
                return j
        return float("inf")

    def access(self, key: int, i: int) -> tuple[bool, int | None]:
        if key in self.resident:
            return True, None
        evicted = None
        if len(self.resident) == self.capacity:
            # never-used-again keys tie at infinity; the larger key goes first, as in the simulator
            evicted = max(self.resident, key=lambda k: (self._next_use(k, i), k))
            self.resident.remove(evicted)
        self.resident.add(key)
        return False, evicted


@dataclass
class RefCounts:
    """Per-key counts; evictions are charged to the evicted key."""

    hits: dict[int, int] = field(default_factory=dict)
    misses: dict[int, int] = field(default_factory=dict)
    evictions: dict[int, int] = field(default_factory=dict)


def ref_simulate(stream: Sequence[int], policy: str, capacity: int,
                 partition: Callable[[int], int] = lambda key: 0) -> RefCounts:
    """Run ``stream`` through one cache of ``capacity`` per partition (``partition(key)``)."""
    make: dict[str, Callable[[], object]] = {
        "lru": lambda: RefLRU(capacity), "fifo": lambda: RefFIFO(capacity),
        "lfu": lambda: RefLFU(capacity), "belady": lambda: RefBelady(capacity, stream),
    }
    caches: dict[int, object] = {}
    out = RefCounts()
    for i, key in enumerate(stream):
        cache = caches.setdefault(partition(key), make[policy]())
        hit, evicted = cache.access(key, i)  # type: ignore[attr-defined]
        bucket = out.hits if hit else out.misses
        bucket[key] = bucket.get(key, 0) + 1
        if evicted is not None:
            out.evictions[evicted] = out.evictions.get(evicted, 0) + 1
    return out


def optimal_misses(stream: Sequence[int], capacity: int) -> int:
    """Fewest misses of any demand-paging cache (a miss inserts, any resident may go), by exhaustive search."""

    @cache
    def best(i: int, resident: frozenset[int]) -> int:
        if i == len(stream):
            return 0
        key = stream[i]
        if key in resident:
            return best(i + 1, resident)
        if len(resident) < capacity:
            return 1 + best(i + 1, resident | {key})
        return 1 + min(best(i + 1, (resident - {v}) | {key}) for v in resident)

    return best(0, frozenset())
