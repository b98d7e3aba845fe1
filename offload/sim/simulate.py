"""Expert-cache simulator over routing traces: hit rates of a policy at a capacity, without a GPU.

The access stream is the one the runtime produces: tokens in order, layers in order within a
token, the top-k experts of a layer top-1 first; the key of an access is
``layer * num_experts + expert``. A cache starts empty once and is never flushed between
sequences, so cold misses count. Two scopes:

* ``per-layer``: every layer has its own cache of ``capacity`` experts (mixtral-offloading's layout);
* ``global``: one cache of ``capacity`` (layer, expert) keys shared by all layers.

Policies are those of :mod:`offload.memory.policies` (lru, lfu, fifo, same semantics) plus ``belady``
(MIN, Belady 1966: evict the key whose next use is farthest; a miss always inserts), the offline
optimum that bounds what any policy or predictor could reach.

:func:`simulate` runs a numba kernel over the key array (tens of millions of accesses per second,
so a whole sweep takes well under a second). :func:`simulate_prefetch` is the plain-Python twin
that lets a predictor prefetch keys between layer steps; without a predictor it gives exactly the
counts of :func:`simulate` (tests check this). The slow oracles live in ``tests/reference.py``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numba
import numpy as np

from offload.errors import BudgetError, ConfigError, PolicyError
from offload.memory.policies import EvictionPolicy, make_policy
from offload.registry import check_name
from offload.stats import HitRate, ratio
from offload.traces.format import Trace

# Policy codes the kernels branch on; the registry below is the only place names meet codes.
# _PYTHON: no kernel, the policy runs in the Python twin (with the runtime's own policy object).
_LRU, _LFU, _FIFO, _BELADY, _LAYER_LRU, _PYTHON = 0, 1, 2, 3, 4, -1
SIM_POLICIES: dict[str, int] = {"lru": _LRU, "lfu": _LFU, "fifo": _FIFO, "belady": _BELADY,
                                "layer-lru": _LAYER_LRU, "predictive": _PYTHON, "layer-budget": _PYTHON}
SCOPES = ("per-layer", "global")


@dataclass(frozen=True, eq=False)
class AccessStream:
    """The flat access stream of a trace: ``keys[i] = layer * num_experts + expert``."""

    keys: np.ndarray  # [tokens * layers * top_k] int32
    num_layers: int
    num_experts: int
    top_k: int

    def __post_init__(self) -> None:
        per_token = self.num_layers * self.top_k
        if (min(self.num_layers, self.num_experts, self.top_k) < 1 or self.keys.ndim != 1
                or not np.issubdtype(self.keys.dtype, np.integer)):
            raise ConfigError(f"bad access stream: {self.num_layers} layers, {self.num_experts} experts, "
                              f"top-{self.top_k}, keys of shape {self.keys.shape} and type {self.keys.dtype}")
        if self.keys.size % per_token:
            raise ConfigError(f"{self.keys.size} accesses is not a whole number of tokens of {per_token}")
        if self.keys.size and (self.keys.min() < 0 or self.keys.max() >= self.num_keys):
            raise ConfigError(f"access keys must lie in 0..{self.num_keys - 1}")

    @classmethod
    def from_experts(cls, experts: np.ndarray, num_experts: int) -> AccessStream:
        """From expert ids of shape [tokens, layers, top_k]."""
        _, num_layers, top_k = experts.shape
        offsets = (np.arange(num_layers, dtype=np.int32) * num_experts)[None, :, None]
        keys = (experts.astype(np.int32) + offsets).reshape(-1)
        return cls(keys, num_layers, num_experts, top_k)

    @classmethod
    def from_trace(cls, trace: Trace) -> AccessStream:
        return cls.from_experts(trace.experts, trace.header.num_experts)

    @property
    def num_keys(self) -> int:
        return self.num_layers * self.num_experts

    @property
    def num_tokens(self) -> int:
        return self.keys.size // (self.num_layers * self.top_k)


@dataclass(frozen=True)
class SimResult(HitRate):
    """Exact counts of one simulation; per-layer tuples are indexed by layer.

    Hits and misses belong to the layer of the accessed key, evictions to the layer of the evicted one.
    ``pin_steps``: replayed in layer steps with their pins, as the runtime runs them (see :func:`simulate`).
    """

    policy: str
    scope: str
    capacity: int
    num_tokens: int
    hits_per_layer: tuple[int, ...]
    misses_per_layer: tuple[int, ...]
    evictions_per_layer: tuple[int, ...]
    pin_steps: bool = False

    @property
    def hits(self) -> int:
        return sum(self.hits_per_layer)

    @property
    def misses(self) -> int:
        return sum(self.misses_per_layer)

    @property
    def evictions(self) -> int:
        return sum(self.evictions_per_layer)

    @property
    def misses_per_token(self) -> float:
        """Expert loads per token, the figure that sets transfer time."""
        return ratio(self.misses, self.num_tokens)


def _source_stream(source: Trace | AccessStream) -> AccessStream:
    return AccessStream.from_trace(source) if isinstance(source, Trace) else source


def _partitions(stream: AccessStream, scope: str) -> tuple[np.ndarray, int, int]:
    """(cache id of every key, number of caches, keys per cache) for a scope."""
    if scope == "per-layer":
        part = np.arange(stream.num_keys, dtype=np.int32) // stream.num_experts
        return part, stream.num_layers, stream.num_experts
    if scope == "global":
        return np.zeros(stream.num_keys, dtype=np.int32), 1, stream.num_keys
    raise ConfigError(f"unknown cache scope {scope!r}", f"use one of: {', '.join(SCOPES)}")


def check_policy(policy: str) -> str:
    """``policy``'s registry name (lower case), or PolicyError when it is not a simulator policy."""
    check_name(SIM_POLICIES, policy, "simulator policy", PolicyError, ordered=True)
    return policy.lower()


def _check(policy: str, capacity: int) -> str:
    policy = check_policy(policy)
    if capacity < 1:
        raise BudgetError(f"cache capacity must be >= 1 expert, got {capacity}")
    return policy


def _result(policy: str, scope: str, capacity: int, stream: AccessStream,
            hits: np.ndarray, misses: np.ndarray, evictions: np.ndarray, pin_steps: bool = False) -> SimResult:
    """Fold per-key counts ([num_keys]) into per-layer tuples."""
    def per_layer(a: np.ndarray) -> tuple[int, ...]:
        return tuple(a.reshape(stream.num_layers, stream.num_experts).sum(axis=1).tolist())
    return SimResult(policy, scope, capacity, stream.num_tokens,
                     per_layer(hits), per_layer(misses), per_layer(evictions), pin_steps)


# ------------------------------------------------------------------------------------ numba kernel
# Every cache is a binary min-heap of its resident keys on an int64 priority; the root is the
# victim. One heap serves all four policies, each is only a different priority, unique per key:
#   lru: time of last use   fifo: time of insertion   lfu: count * n + time of last use
#   belady: -(index of next use), -(n + key) for "never again" (so the larger such key goes first)
# The caches' heaps sit side by side in flat arrays, cache p at [p * slots, p * slots + size[p]);
# `heap` holds keys and `hprio` their priorities next to them (sifting reads no other array).


@numba.njit(cache=True)
def _next_use(keys: np.ndarray, num_keys: int) -> np.ndarray:
    """Index of the next access of the same key, n + key if none (one backwards pass)."""
    n = keys.shape[0]
    nxt = np.empty(n, dtype=np.int64)
    last = np.arange(n, n + num_keys, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        nxt[i] = last[keys[i]]
        last[keys[i]] = i
    return nxt


@numba.njit(cache=True, inline="always")
def _put(heap: np.ndarray, hprio: np.ndarray, slot: np.ndarray, j: int, key: int, prio: int) -> None:
    heap[j] = key
    hprio[j] = prio
    slot[key] = j


@numba.njit(cache=True)
def _sift_up(heap: np.ndarray, hprio: np.ndarray, slot: np.ndarray, base: int, i: int) -> None:
    """Move the entry at i up to its place, shifting parents down into the hole."""
    key, prio = heap[i], hprio[i]
    while i > base:
        parent = base + ((i - base - 1) >> 1)
        if hprio[parent] <= prio:
            break
        _put(heap, hprio, slot, i, heap[parent], hprio[parent])
        i = parent
    _put(heap, hprio, slot, i, key, prio)


@numba.njit(cache=True)
def _sift_down(heap: np.ndarray, hprio: np.ndarray, slot: np.ndarray, base: int, size: int, i: int) -> None:
    """Move the entry at i down to its place, shifting smaller children up into the hole."""
    end = base + size
    key, prio = heap[i], hprio[i]
    while True:
        child = base + 2 * (i - base) + 1
        if child >= end:
            break
        if child + 1 < end and hprio[child + 1] < hprio[child]:
            child += 1
        if prio <= hprio[child]:
            break
        _put(heap, hprio, slot, i, heap[child], hprio[child])
        i = child
    _put(heap, hprio, slot, i, key, prio)


@numba.njit(cache=True)
def _counters(num_keys: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-key hits, misses and evictions, zeroed."""
    return (np.zeros(num_keys, dtype=np.int64), np.zeros(num_keys, dtype=np.int64),
            np.zeros(num_keys, dtype=np.int64))


@numba.njit(cache=True)
def _lists(num_keys: int, num_lists: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Doubly linked recency lists over keys, all empty: key -> previous, next; list -> head, tail (-1: none)."""
    return (np.full(num_keys, -1, dtype=np.int64), np.full(num_keys, -1, dtype=np.int64),
            np.full(num_lists, -1, dtype=np.int64), np.full(num_lists, -1, dtype=np.int64))


@numba.njit(cache=True)
def _heaps(num_parts: int, slots: int, num_keys: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One min-heap of ``slots`` per cache, flat: [cache, slot] -> key and its priority; keys per heap;
    key -> its index in the flat heap (-1: not resident)."""
    return (np.empty(num_parts * slots, dtype=np.int64), np.empty(num_parts * slots, dtype=np.int64),
            np.zeros(num_parts, dtype=np.int64), np.full(num_keys, -1, dtype=np.int64))


@numba.njit(cache=True)
def _simulate_kernel(keys: np.ndarray, part: np.ndarray, num_parts: int, slots: int, policy: int,
                     nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the stream through ``num_parts`` caches of ``slots`` keys; per-key hits, misses, evictions."""
    n = keys.shape[0]
    num_keys = part.shape[0]
    heap, hprio, size, slot = _heaps(num_parts, slots, num_keys)
    count = np.zeros(num_keys, dtype=np.int64)
    hits, misses, evictions = _counters(num_keys)
    for i in range(n):
        k = keys[i]
        p = part[k]
        base = p * slots
        j = slot[k]
        if policy == _LRU:
            prio = i
        elif policy == _LFU:
            count[k] += 1
            prio = count[k] * n + i
        elif policy == _FIFO:
            prio = hprio[j] if j >= 0 else i
        else:
            prio = -nxt[i]
        if j >= 0:
            hits[k] += 1
            hprio[j] = prio
            if policy == _BELADY:  # the next use only moves away: the priority falls
                _sift_up(heap, hprio, slot, base, j)
            elif policy != _FIFO:  # lru and lfu priorities only rise
                _sift_down(heap, hprio, slot, base, size[p], j)
        elif size[p] == slots:  # full: the new key takes the victim's place at the root
            misses[k] += 1
            victim = heap[base]
            evictions[victim] += 1
            slot[victim] = -1
            _put(heap, hprio, slot, base, k, prio)
            _sift_down(heap, hprio, slot, base, slots, base)
        else:
            misses[k] += 1
            j = base + size[p]
            size[p] += 1
            _put(heap, hprio, slot, j, k, prio)
            _sift_up(heap, hprio, slot, base, j)
    return hits, misses, evictions


@numba.njit(cache=True)
def _lru_kernel(keys: np.ndarray, part: np.ndarray, num_parts: int,
                slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LRU in O(1) per access: one doubly linked recency list per cache (head = least recent).

    Same counts as the heap kernel with priority = time of last use, without its log(slots) sift
    on every hit: 4-5x faster on the HumanEval trace (85-108 M accesses/s against 19-20 M, global).
    """
    n = keys.shape[0]
    num_keys = part.shape[0]
    prev, nxt, head, tail = _lists(num_keys, num_parts)
    size = np.zeros(num_parts, dtype=np.int64)
    resident = np.zeros(num_keys, dtype=np.bool_)
    hits, misses, evictions = _counters(num_keys)
    for i in range(n):
        k = keys[i]
        p = part[k]
        if resident[k]:
            hits[k] += 1
            if tail[p] == k:
                continue
            # unlink k (it is not the tail, so it has a successor)
            if prev[k] >= 0:
                nxt[prev[k]] = nxt[k]
            else:
                head[p] = nxt[k]
            prev[nxt[k]] = prev[k]
        else:
            misses[k] += 1
            resident[k] = True
            if size[p] == slots:  # evict the head, the least recently used
                victim = head[p]
                evictions[victim] += 1
                resident[victim] = False
                head[p] = nxt[victim]
                if head[p] >= 0:
                    prev[head[p]] = -1
                else:
                    tail[p] = -1
                nxt[victim] = -1
            else:
                size[p] += 1
        _append(prev, nxt, head, tail, p, k)  # at the tail: the most recently used
    return hits, misses, evictions


# --------------------------------------------------------------------- step-pinned kernels
# With ``pin_steps`` the stream is replayed the way the runtime's MoE layer runs a step (memory/cache.py's
# LayerStep): the top-k keys of one (token, layer) step are accessed resident ones first, each group
# in key order, and all of them stay pinned until the step ends. A miss evicts a key outside the
# step; when every resident key belongs to the step (a cache smaller than a step), the step's
# earliest-used key goes, as the runtime releases its experts in the order they computed.


@numba.njit(cache=True)
def _runtime_order(step: np.ndarray, here: np.ndarray) -> np.ndarray:
    """Positions of a step's keys in the runtime's access order: resident (``here``) first, then by key."""
    m = step.shape[0]
    order = np.empty(m, dtype=np.int64)
    taken = np.zeros(m, dtype=np.bool_)
    rank = np.empty(m, dtype=np.int64)  # (not resident, key) as one number
    for j in range(m):
        rank[j] = (0 if here[j] else 1 << 40) + step[j]
    for o in range(m):  # selection sort: top-k is a handful of keys
        best = -1
        for j in range(m):
            if not taken[j] and (best < 0 or rank[j] < rank[best]):
                best = j
        taken[best] = True
        order[o] = best
    return order


@numba.njit(cache=True)
def _heap_remove(heap: np.ndarray, hprio: np.ndarray, slot: np.ndarray, base: int, size: np.ndarray, p: int,
                 j: int) -> None:
    """Take the entry at j out of cache p's heap (its key's slot is left for the caller to set)."""
    last = base + size[p] - 1
    size[p] -= 1
    if j != last:
        _put(heap, hprio, slot, j, heap[last], hprio[last])
        _sift_up(heap, hprio, slot, base, j)
        _sift_down(heap, hprio, slot, base, size[p], j)


@numba.njit(cache=True)
def _step_kernel(keys: np.ndarray, part: np.ndarray, num_parts: int, slots: int, policy: int, nxt: np.ndarray,
                 top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The heap kernel's policies replayed in pinned layer steps; per-key hits, misses, evictions.

    A step's keys leave the heap while they are pinned (slot -2) and return with their new
    priorities when it ends; lru and lfu times are the access order within the step, belady's
    next uses are positions in the trace.
    """
    n = keys.shape[0]
    num_keys = part.shape[0]
    heap, hprio, size, slot = _heaps(num_parts, slots, num_keys)  # slot -2: pinned (out of its heap)
    count = np.zeros(num_keys, dtype=np.int64)
    hits, misses, evictions = _counters(num_keys)
    pin_key = np.empty(top_k, dtype=np.int64)
    pin_prio = np.empty(top_k, dtype=np.int64)
    here = np.empty(top_k, dtype=np.bool_)
    clock = 0
    for s in range(0, n, top_k):
        step = keys[s:s + top_k]
        for j in range(top_k):
            here[j] = slot[step[j]] >= 0
        order = _runtime_order(step, here)
        p = part[step[0]]  # a step is one layer: one cache in either scope
        base = p * slots
        first = npin = 0  # pin_key[first:npin] are the step's pinned keys, in access order
        for o in range(top_k):
            j = order[o]
            k = step[j]
            clock += 1
            if policy == _LFU:
                count[k] += 1
            if here[j]:
                hits[k] += 1
                old = hprio[slot[k]]
                _heap_remove(heap, hprio, slot, base, size, p, slot[k])
            else:
                misses[k] += 1
                old = clock
                if size[p] + npin - first == slots:
                    if size[p] > 0:  # the policy's victim among the keys outside the step
                        victim = heap[base]
                        _heap_remove(heap, hprio, slot, base, size, p, base)
                    else:  # all resident keys are this step's: the earliest used is released first
                        victim = pin_key[first]
                        first += 1
                    evictions[victim] += 1
                    slot[victim] = -1
            if policy == _LRU:
                prio = clock
            elif policy == _LFU:
                prio = count[k] * n + clock
            elif policy == _FIFO:
                prio = old
            else:
                prio = -nxt[s + j]
            slot[k] = -2
            pin_key[npin] = k
            pin_prio[npin] = prio
            npin += 1
        for q in range(first, npin):  # the step ends: its keys may be evicted again
            j = base + size[p]
            size[p] += 1
            _put(heap, hprio, slot, j, pin_key[q], pin_prio[q])
            _sift_up(heap, hprio, slot, base, j)
    return hits, misses, evictions


@numba.njit(cache=True)
def _unlink(prv: np.ndarray, nxt: np.ndarray, head: np.ndarray, tail: np.ndarray, layer: int, k: int) -> None:
    if prv[k] >= 0:
        nxt[prv[k]] = nxt[k]
    else:
        head[layer] = nxt[k]
    if nxt[k] >= 0:
        prv[nxt[k]] = prv[k]
    else:
        tail[layer] = prv[k]
    prv[k] = nxt[k] = -1


@numba.njit(cache=True)
def _append(prv: np.ndarray, nxt: np.ndarray, head: np.ndarray, tail: np.ndarray, layer: int, k: int) -> None:
    prv[k] = tail[layer]
    nxt[k] = -1
    if tail[layer] >= 0:
        nxt[tail[layer]] = k
    else:
        head[layer] = k
    tail[layer] = k


@numba.njit(cache=True)
def _layer_victim(head: np.ndarray, nxt: np.ndarray, mark: np.ndarray, part: np.ndarray, num_layers: int,
                  current: int, p: int, step: int) -> int:
    """layer-lru's victim in cache p: the layer whose next visit is farthest first (the current one, then
    the one before it, ...), its least recently used key not used by this step; else the step's earliest."""
    for d in range(num_layers):
        layer = (current - d) % num_layers
        k = head[layer]
        if k < 0 or part[k] != p:  # a layer's keys all live in one cache
            continue
        while k >= 0:
            if mark[k] != step:
                return k
            k = nxt[k]
    return head[current]


@numba.njit(cache=True)
def _layer_lru_kernel(keys: np.ndarray, part: np.ndarray, num_parts: int, slots: int, num_experts: int,
                      top_k: int, pin_steps: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """layer-lru with one recency list per layer (head = least recent); per-key hits, misses, evictions.

    ``mark[k]`` is the last step that used k: a step's own keys are passed over while choosing a
    victim, so they are never evicted while another key can go (with ``pin_steps`` they are also
    accessed in the runtime's order).
    """
    n = keys.shape[0]
    num_keys = part.shape[0]
    num_layers = num_keys // num_experts
    prv, nxt, head, tail = _lists(num_keys, num_layers)
    size = np.zeros(num_parts, dtype=np.int64)
    resident = np.zeros(num_keys, dtype=np.bool_)
    mark = np.full(num_keys, -1, dtype=np.int64)
    hits, misses, evictions = _counters(num_keys)
    here = np.empty(top_k, dtype=np.bool_)
    for s in range(n // top_k):
        step = keys[s * top_k:(s + 1) * top_k]
        for j in range(top_k):
            here[j] = resident[step[j]]
        order = _runtime_order(step, here) if pin_steps else np.arange(top_k)
        current = step[0] // num_experts
        for o in range(top_k):
            k = step[order[o]]
            p = part[k]
            if resident[k]:
                hits[k] += 1
                _unlink(prv, nxt, head, tail, current, k)
            else:
                misses[k] += 1
                if size[p] == slots:
                    victim = _layer_victim(head, nxt, mark, part, num_layers, current, p, s)
                    evictions[victim] += 1
                    resident[victim] = False
                    _unlink(prv, nxt, head, tail, victim // num_experts, victim)
                else:
                    size[p] += 1
                resident[k] = True
            _append(prv, nxt, head, tail, current, k)
            mark[k] = s
    return hits, misses, evictions


def simulate(source: Trace | AccessStream, policy: str = "lru", scope: str = "per-layer",
             capacity: int = 4, pin_steps: bool = False) -> SimResult:
    """Exact hit/miss/eviction counts of ``policy`` with ``capacity`` experts per cache of ``scope``.

    Access by access in the trace's order (the default: the reference table's replay), or with
    ``pin_steps`` in layer steps pinned and ordered as the runtime runs them, whose counts equal the
    runtime cache's. Policies without a kernel (``predictive``, ``layer-budget``) run in the Python
    twin, with the runtime's own policy objects.
    """
    policy = _check(policy, capacity)
    stream = _source_stream(source)
    code = SIM_POLICIES[policy]
    if code == _PYTHON:
        return simulate_prefetch(stream, policy, scope, capacity, pin_steps=pin_steps).sim
    part, num_parts, keys_per_part = _partitions(stream, scope)
    nxt = _next_use(stream.keys, stream.num_keys) if code == _BELADY else np.empty(0, dtype=np.int64)
    slots = min(capacity, keys_per_part)
    if code == _LAYER_LRU:
        counts = _layer_lru_kernel(stream.keys, part, num_parts, slots, stream.num_experts, stream.top_k, pin_steps)
    elif pin_steps:
        counts = _step_kernel(stream.keys, part, num_parts, slots, code, nxt, stream.top_k)
    elif code == _LRU:
        counts = _lru_kernel(stream.keys, part, num_parts, slots)
    else:
        counts = _simulate_kernel(stream.keys, part, num_parts, slots, code, nxt)
    return _result(policy, scope, capacity, stream, *counts, pin_steps=pin_steps)


# ------------------------------------------------------------------------- prediction-aware (Python)


@dataclass(frozen=True, eq=False)
class Step:
    """What a predictor may see after layer ``layer`` of token ``token``: the past, never the future."""

    token: int
    layer: int
    num_experts: int
    past: np.ndarray  # [token, layers, top_k] expert ids of the earlier tokens
    current: np.ndarray  # [layer + 1, top_k] expert ids of this token so far

    def key(self, layer: int, expert: int) -> int:
        """The simulator key a predictor returns for (layer, expert)."""
        return layer * self.num_experts + expert


@dataclass(frozen=True, eq=False)
class Proposal:
    """A predictor's answer with probabilities: keys to prefetch, best first, and for each predicted
    layer the probability that its next step uses each expert (what a prediction-aware policy ranks by)."""

    keys: Sequence[int]
    probs: Mapping[int, np.ndarray] = field(default_factory=dict)  # layer -> [num_experts]


Predictor = Callable[[Step], "Iterable[int] | Proposal"]
"""Called after each layer step; returns keys to prefetch (usually for the next layers), or a Proposal."""


@dataclass(frozen=True)
class PrefetchResult:
    """Counts of a prediction-aware run.

    ``issued == used + wasted``: a prefetch is used when demanded before it is evicted, wasted
    otherwise: when its layer runs without it (it is then first in line for eviction, as in the
    runtime cache), when it is evicted first, or when the trace ends. A demand access to a
    prefetch issued fewer than ``latency`` layer steps earlier is a hit that waits for its
    transfer: a stall.
    """

    sim: SimResult
    latency: int
    issued: int
    used: int
    wasted: int
    stalls: int
    miss_causes: Mapping[str, int] = field(default_factory=dict)
    warm_loads: int = 0   # keys a warm start loaded before a token (task patterns, see simulate_prefetch)
    warm_hits: int = 0    # ... demanded while still resident
    token_misses: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # demand misses per token
    """Demand misses by what had evicted the key: ``"cold"`` (never resident), or ``"demand +d"`` /
    ``"prefetch +d"``, the eviction made room for a demand miss or a prefetch at a step d layers
    before the key's own layer (+0: the key's layer had just run; +1: it was the next to run)."""

    @property
    def effective_hit_rate(self) -> float:
        """1 - (misses + stalls) / accesses: the share of accesses served without waiting."""
        return 1.0 - ratio(self.sim.misses + self.stalls, self.sim.accesses)

    @property
    def loads(self) -> int:
        """Experts moved: every demand miss and every prefetch."""
        return self.sim.misses + self.issued


class _Belady(EvictionPolicy):
    """MIN over the known future, for the Python path; shares one next-use table across caches."""

    name = "belady"

    def __init__(self, future: dict[Hashable, deque[int]]) -> None:
        self._future = future

    def on_access(self, key: Hashable, hit: bool) -> None:
        self._future[key].popleft()

    def on_insert(self, key: Hashable) -> None:
        pass

    def on_evict(self, key: Hashable) -> None:
        pass

    def victim(self, candidates: Iterable[Hashable], incoming: Hashable | None = None) -> Hashable:
        def next_at(k: Hashable) -> tuple[float, Hashable]:  # never again: farthest, larger key first
            q = self._future.get(k)
            return (q[0], k) if q else (float("inf"), k)
        return max(candidates, key=next_at)


Access = tuple[int, bool, "int | None"]
"""(key, hit, the key it evicted or None)."""


class _PyCaches:
    """The Python twin of the kernels' caches, with prefetch and pins.

    Keys are ints here (``layer * num_experts + expert``); the policies are the runtime's own
    objects and see ``(layer, expert)`` tuples, as in the runtime cache.
    """

    def __init__(self, stream: AccessStream, policy: str, scope: str, capacity: int, **options: object) -> None:
        part, num_parts, _ = _partitions(stream, scope)
        self.part = part.tolist()
        self.capacity = capacity
        self.num_experts = stream.num_experts
        self.resident: list[set[int]] = [set() for _ in range(num_parts)]
        if policy == "belady":
            future: dict[Hashable, deque[int]] = {}
            for i, k in enumerate(stream.keys.tolist()):
                future.setdefault(self._pair(k), deque()).append(i)
            self.policies: list[EvictionPolicy] = [_Belady(future) for _ in range(num_parts)]
        else:
            self.policies = [make_policy(policy, **options) for _ in range(num_parts)]
        for p, pol in enumerate(self.policies):
            pol.attach(capacity, sorted({k // stream.num_experts for k in range(stream.num_keys) if self.part[k] == p}))

    def _pair(self, key: int) -> tuple[int, int]:
        return divmod(key, self.num_experts)

    def begin_layer(self, layer: int) -> None:
        """A layer step begins: the policy of the layer's cache hears of it."""
        self.policies[self.part[layer * self.num_experts]].on_layer(layer)

    def scores(self, layer: int, probs: np.ndarray) -> None:
        self.policies[self.part[layer * self.num_experts]].on_scores(layer, probs)

    def _evict(self, p: int, victim: int) -> None:
        self.resident[p].discard(victim)
        self.policies[p].on_evict(self._pair(victim))

    def _make_room(self, p: int, pinned: set[int], incoming: int) -> tuple[bool, int | None]:
        """Evict one key of cache ``p`` if full; (room made, evicted key)."""
        if len(self.resident[p]) < self.capacity:
            return True, None
        candidates = self.resident[p] - pinned
        if not candidates:
            return False, None
        victim = self.policies[p].victim([self._pair(k) for k in candidates], self._pair(incoming))
        victim = victim[0] * self.num_experts + victim[1]  # type: ignore[index]
        self._evict(p, victim)
        return True, victim

    def _insert(self, p: int, key: int) -> None:
        self.resident[p].add(key)
        self.policies[p].on_insert(self._pair(key))

    def access(self, key: int) -> tuple[bool, int | None]:
        """A demand access; (hit, evicted key). A miss always inserts."""
        p = self.part[key]
        if key in self.resident[p]:
            self.policies[p].on_access(self._pair(key), True)
            return True, None
        _, victim = self._make_room(p, set(), key)
        self._insert(p, key)
        self.policies[p].on_access(self._pair(key), False)
        return False, victim

    def step(self, keys: list[int]) -> list[Access]:
        """A pinned layer step, as memory/cache.py's LayerStep runs it: resident keys first, each group in key order.

        Every key stays pinned to the end of the step; when all resident keys are the step's own
        (a cache smaller than a step), the earliest used is released and evicted.
        """
        p = self.part[keys[0]]
        resident = self.resident[p]
        order = sorted(k for k in keys if k in resident) + sorted(k for k in keys if k not in resident)
        held: list[int] = []
        out: list[Access] = []
        for k in order:
            hit, victim = k in resident, None
            if not hit:
                room, victim = self._make_room(p, set(held), k)
                if not room:
                    victim = next(h for h in held if h in resident)
                    self._evict(p, victim)
                self._insert(p, k)
            self.policies[p].on_access(self._pair(k), hit)
            held.append(k)
            out.append((k, hit, victim))
        return out

    def demote(self, key: int) -> None:
        """A prefetch its layer did not use: first in line for eviction (as the runtime cache does)."""
        p = self.part[key]
        if key in self.resident[p]:
            self.policies[p].on_demote(self._pair(key))

    def warm(self, keys: Sequence[int]) -> list[tuple[int, int | None]]:
        """A warm start: insert ``keys`` (best first) while their cache has a free slot or a key that is not one of
        them to evict, as the runtime cache's ``warm`` does; [(inserted key, evicted key)]."""
        protect, out = set(keys), []
        for k in keys:
            inserted, victim = self.prefetch(k, protect)
            if inserted:
                out.append((k, victim))
        return out

    def prefetch(self, key: int, pinned: set[int]) -> tuple[bool, int | None]:
        """Insert ``key`` ahead of use, never evicting ``pinned``; (inserted, evicted key)."""
        p = self.part[key]
        if key in self.resident[p]:
            return False, None
        room, victim = self._make_room(p, pinned, key)
        if room:
            self._insert(p, key)
        return room, victim


class _PrefetchRun:
    """The counts of one simulate_prefetch run, and the bookkeeping of prefetches in flight."""

    def __init__(self, stream: AccessStream, caches: _PyCaches, latency: int, protect_proposals: bool) -> None:
        self.stream, self.caches, self.latency = stream, caches, latency
        self.protect_proposals = protect_proposals
        self.counts = np.zeros((3, stream.num_keys), dtype=np.int64)  # hits, misses, evictions per key
        self.pending: dict[int, int] = {}  # prefetched key -> step issued, until demanded or evicted
        self.issued = self.used = self.wasted = self.stalls = 0
        self.evicted_by: dict[int, str] = {}  # evicted key -> how (see PrefetchResult.miss_causes)
        self.causes: dict[str, int] = {}
        self.warmed: set[int] = set()  # warm-loaded keys not demanded yet
        self.warm_loads = self.warm_hits = 0
        self.token_misses = np.zeros(stream.num_tokens, dtype=np.int64)

    def evicted(self, key: int | None, kind: str, step: int) -> None:
        if key is not None:
            self.counts[2, key] += 1
            self.warmed.discard(key)
            self.wasted += self.pending.pop(key, None) is not None
            ahead = (key // self.stream.num_experts - step % self.stream.num_layers) % self.stream.num_layers
            self.evicted_by[key] = f"{kind} +{ahead}"

    def demand(self, step: int, accesses: list[Access]) -> None:
        for k, hit, victim in accesses:
            if k in self.pending:
                self.used += 1
                self.stalls += step - self.pending.pop(k) < self.latency
            self.counts[0 if hit else 1, k] += 1
            if hit and k in self.warmed:
                self.warm_hits += 1
            self.warmed.discard(k)
            if not hit:
                self.token_misses[step // self.stream.num_layers] += 1
                cause = self.evicted_by.pop(k, "cold")
                self.causes[cause] = self.causes.get(cause, 0) + 1
            self.evicted(victim, "demand", step)

    def expire(self, layer: int) -> None:
        """``layer`` ran: its prefetches it did not use were wasted and go first in line."""
        for k in sorted(k for k in self.pending if k // self.stream.num_experts == layer):  # as the runtime cache
            del self.pending[k]
            self.wasted += 1
            self.caches.demote(k)

    def warm(self, step: int, keys: Sequence[int]) -> None:
        for k, victim in self.caches.warm([int(k) for k in keys]):
            self.evicted(victim, "warm", step)
            self.warmed.add(k)
            self.warm_loads += 1

    def prefetch(self, step: int, proposal: Iterable[int] | Proposal, demand: list[int]) -> None:
        if isinstance(proposal, Proposal):
            for layer, probs in proposal.probs.items():
                self.caches.scores(layer, probs)
            proposal = proposal.keys
        keys = [int(k) for k in proposal]
        for k in keys:
            if not 0 <= k < self.stream.num_keys:
                raise ConfigError(f"predictor proposed key {k}, outside 0..{self.stream.num_keys - 1}")
        # as the runtime's prefetcher: never evict what this layer uses or a key proposed ahead of this one
        protect = set(demand)
        for k in keys:
            if self.protect_proposals:
                protect.add(k)
            inserted, victim = self.caches.prefetch(k, protect)
            self.evicted(victim, "prefetch", step)
            if inserted:
                self.issued += 1
                self.pending[k] = step


def simulate_prefetch(source: Trace | AccessStream, policy: str = "lru", scope: str = "per-layer",
                      capacity: int = 4, predictor: Predictor | None = None, latency: int = 1,
                      pin_steps: bool = False, protect_proposals: bool = True,
                      warm: Mapping[int, Sequence[int]] | None = None, **options: object) -> PrefetchResult:
    """Like :func:`simulate`, but a predictor may prefetch keys after each layer step.

    After the demand accesses of (token, layer) -- whose keys are pinned, they are computing --
    ``predictor(step)`` proposes keys, best first; each one not resident is inserted, evicting by
    the policy but never a key of this step or one proposed ahead of it (as the runtime's
    prefetcher protects them). A prefetch issued after step s is ready at step s + ``latency`` (1: in time for the next
    layer). ``pin_steps`` replays the demand accesses as the runtime does (see :func:`simulate`);
    ``protect_proposals=False`` lets a prefetch evict a key proposed ahead of it at the same step
    (what this simulator did before it matched the runtime: kept to measure the difference); ``warm`` maps a
    token index to the keys a warm start loads (best first) before that token, as the runtime does at a
    request's first decode step (see :func:`warm_starts`); ``options`` go to the policy's constructor.
    """
    policy = _check(policy, capacity)
    if latency < 0:
        raise ConfigError(f"prefetch latency must be >= 0 layer steps, got {latency}")
    stream = _source_stream(source)
    caches = _PyCaches(stream, policy, scope, capacity, **options)
    run = _PrefetchRun(stream, caches, latency, protect_proposals)
    keys = stream.keys.reshape(stream.num_tokens, stream.num_layers, stream.top_k)
    experts = keys - (np.arange(stream.num_layers, dtype=np.int32) * stream.num_experts)[None, :, None]
    warm = warm or {}
    for t in range(stream.num_tokens):
        if t in warm:
            run.warm(t * stream.num_layers, warm[t])
        for layer in range(stream.num_layers):
            step = t * stream.num_layers + layer
            demand = keys[t, layer].tolist()
            caches.begin_layer(layer)
            run.demand(step, caches.step(demand) if pin_steps else [(k, *caches.access(k)) for k in demand])
            if predictor is not None:
                run.expire(layer)
                run.prefetch(step, predictor(Step(t, layer, stream.num_experts, experts[:t], experts[t, :layer + 1])),
                             demand)
    sim = _result(policy, scope, capacity, stream, *run.counts, pin_steps=pin_steps)
    causes = dict(sorted(run.causes.items(), key=lambda kv: -kv[1]))
    return PrefetchResult(sim, latency, run.issued, run.used, run.wasted + len(run.pending), run.stalls, causes,
                          run.warm_loads, run.warm_hits, run.token_misses)
