"""The fast-tier expert cache: a fixed number of equal slots on the compute device.

It owns residency, pinning and the counts; a policy (memory/policies.py) only picks victims, and a mover
(memory/transfer.py, one per device type) owns the slot memory and moves the bytes. An expert that a layer
is using is pinned and never evicted.

Loads are asynchronous when the cache has a loader thread (``async_loads=True``, which the
prefetcher needs): ``reserve`` books a slot and queues the load, ``wait`` blocks until its bytes
are there. All bookkeeping (residency, policy, counts) happens on the caller's thread; the loader
thread only moves bytes, one expert at a time, so one disk is read sequentially and the staging
buffers have one user. Victims are chosen as if loads were instant, so every count is
independent of timing; evicting an expert whose load is still in flight first waits for it.

A load that fails (a disk error, an interrupt) leaves nothing behind: the expert is forgotten, its slot
is free again, and the error reaches the caller that demanded it, so a later step reloads it instead of
reading a half-filled slot. ``check`` states the invariants; generate() checks them between calls.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from offload.experts.layouts import Expert, Key, SlotLayout
from offload.memory.policies import EvictionPolicy
from offload.memory.transfer import ExpertStore, make_mover
from offload.stats import Stats

log = logging.getLogger(__name__)


class CacheStateError(RuntimeError):
    """The cache's bookkeeping broke an invariant (a bug, never a user's fault): refuse rather than compute wrong."""


class ExpertCache:
    """Fixed slots, exact hit/miss/eviction accounting, loads through a store."""

    def __init__(
        self,
        store: ExpertStore,
        num_slots: int,
        slot_layout: SlotLayout,
        device: torch.device,
        policy: EvictionPolicy,
        stats: Stats,
        async_loads: bool = False,
        layers: Sequence[int] | None = None,
    ) -> None:
        if num_slots < 1:
            raise ValueError("an expert cache needs at least one slot")
        self.store = store
        self.device = device
        self.policy = policy
        policy.attach(num_slots, layers)  # layers: the MoE layers in decode order, for layer-aware policies
        self.stats = stats
        self.num_slots = num_slots
        self.mover = make_mover(store, num_slots, slot_layout, device)
        self.slot_nbytes = self.mover.slot_nbytes
        self._free = list(range(num_slots - 1, -1, -1))
        self._slot_of: dict[Hashable, int] = {}
        self._experts: dict[int, Expert] = {}  # slot -> its expert, bound to the slot's bytes
        self._pins: dict[Hashable, int] = {}
        self._inflight: dict[Hashable, Future] = {}  # key -> its load, until a wait() sees it done
        self._prefetched: set[Hashable] = set()       # resident (or loading) by prefetch, not yet demanded
        self._warmed: set[Hashable] = set()           # resident (or loading) by warm start, not yet demanded
        self._dropped: set[Hashable] = set()          # pinned when their load failed: forgotten, release() pending
        self.evict_wait_s = 0.0                       # time spent waiting for a victim's load to land
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="offload-loader") if async_loads else None

    # -- queries ---------------------------------------------------------------------------
    @property
    def resident(self) -> set[Hashable]:
        return set(self._slot_of)

    @property
    def resident_nbytes(self) -> int:
        """Bytes of device memory the slots occupy: fixed by the budget, never exceeded."""
        return self.mover.slots.numel()

    @property
    def pinned(self) -> set[Hashable]:
        return set(self._pins)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slot_of

    @property
    def prefetched(self) -> int:
        """Experts prefetched and not yet used (they count against the prefetch budget)."""
        return len(self._prefetched)

    def can_acquire(self, key: Hashable) -> bool:
        """True when acquiring ``key`` now would not need to evict a pinned expert."""
        return key in self._slot_of or bool(self._free) or any(self._evictable(k) for k in self._slot_of)

    def _evictable(self, key: Hashable) -> bool:
        return key not in self._pins

    # -- use -------------------------------------------------------------------------------
    def step(self, layer: int, needed: Iterable[int]) -> LayerStep:
        """One MoE layer step over the experts ``needed``: pins what fits now and queues their loads."""
        return LayerStep(self, layer, needed)

    def predicted(self, layer: int, probs) -> None:
        """The predictor's probabilities ([num_experts]) that ``layer``'s next step uses each expert."""
        self.policy.on_scores(layer, probs)

    def acquire(self, key: Key) -> Expert:
        """Pin ``key`` (loading it on a miss) and return the expert bound to its slot."""
        self.reserve(key)
        return self.wait(key)

    def reserve(self, key: Key) -> None:
        """Pin ``key`` and count the access; on a miss take a slot and queue the load (async) or load it."""
        layer_stats = self.stats.layer(key[0])
        if key in self._slot_of:
            layer_stats.hits += 1
            self.policy.on_access(key, hit=True)
            if key in self._prefetched:
                self._prefetched.discard(key)
                layer_stats.prefetch_used += 1
            if key in self._warmed:
                self._warmed.discard(key)
                layer_stats.warm_hits += 1
        else:
            layer_stats.misses += 1
            start = time.perf_counter()
            self._insert(key, self._take_slot(incoming=key), layer_stats)
            if self._loader is None:  # a synchronous load is a stall by definition
                layer_stats.stalls += 1
                layer_stats.stall_time_s += time.perf_counter() - start
            self.policy.on_access(key, hit=False)
        self._pins[key] = self._pins.get(key, 0) + 1

    def landed(self, key: Key) -> bool:
        """Whether a reserved expert's bytes are in its slot (``wait`` returns it without stalling)."""
        load = self._inflight.get(key)
        return load is None or load.done()

    def wait(self, key: Key) -> Expert:
        """A reserved expert, once its bytes are in the slot (a stall if they are not yet).

        A failed load is re-raised here, on the caller's thread, after the expert is forgotten (its pin
        becomes a no-op release). The future leaves ``_inflight`` only once done, so an interrupt while
        waiting leaves the load tracked."""
        load = self._inflight.get(key)
        if load is not None:
            if not load.done():
                start = time.perf_counter()
                layer_stats = self.stats.layer(key[0])
                layer_stats.stalls += 1
                futures.wait([load])
                layer_stats.stall_time_s += time.perf_counter() - start
            del self._inflight[key]
            if load.exception() is not None:
                del self._pins[key]  # its holder's release() becomes a no-op
                self._dropped.add(key)
                self._free.append(self._forget(key))
                raise load.exception()
        slot = self._slot_of[key]
        self.mover.ready(slot)
        return self._experts[slot]

    def prefetch(self, key: Key, protect: Iterable[Hashable] = ()) -> bool:
        """Start loading ``key`` ahead of use into a free slot or by evicting one not in ``protect``.

        Returns False (and does nothing) when ``key`` is already resident or no slot can be had.
        The policy sees the insertion; the access is counted when ``reserve`` demands it.
        """
        if key in self._slot_of:
            return False
        if not self._free:
            protected = set(protect)
            if not any(self._evictable(k) and k not in protected for k in self._slot_of):
                return False
        else:
            protected = set()
        layer_stats = self.stats.layer(key[0])
        self._insert(key, self._take_slot(protected, incoming=key), layer_stats)
        self._prefetched.add(key)
        layer_stats.prefetch_issued += 1
        return True

    def warm(self, keys: Iterable[Key], protect: Iterable[Hashable] = ()) -> int:
        """Load ``keys`` (best first) at a request's start while slots last; returns how many were loaded.

        Room comes from free slots, else from evicting (by the policy) a key that is neither pinned, in ``protect``
        (what other running requests use) nor one of ``keys``. These loads are not accesses: a warm-loaded
        expert's first demand counts as a hit, and as a warm hit.
        """
        keys = list(keys)
        protected = set(protect) | set(keys)
        loaded = 0
        for key in keys:
            if key in self._slot_of:
                continue
            if not self._free and not any(self._evictable(k) and k not in protected for k in self._slot_of):
                break
            layer_stats = self.stats.layer(key[0])
            self._insert(key, self._take_slot(protected, incoming=key), layer_stats)
            self._warmed.add(key)
            layer_stats.warm_loads += 1
            loaded += 1
        return loaded

    def expire_prefetches(self, layer: int, used: Iterable[int]) -> None:
        """``layer`` routed to ``used``: its other prefetched experts were wasted; evict them first."""
        used = set(used)
        for key in sorted(k for k in self._prefetched if k[0] == layer and k[1] not in used):  # (a set's order
            # would make the demotion order, and so the victims of recency policies, arbitrary)
            self._prefetched.discard(key)
            self.stats.layer(layer).prefetch_wasted += 1
            self.policy.on_demote(key)

    def _insert(self, key: Key, slot: int, layer_stats) -> None:
        self._slot_of[key] = slot
        self.policy.on_insert(key)
        if self._loader is not None:
            self._inflight[key] = self._loader.submit(self._load, key, slot, layer_stats)
            return
        try:
            self._load(key, slot, layer_stats)
        except BaseException:  # a failed or interrupted load: the slot holds nothing usable
            self._free.append(self._forget(key))
            raise

    def release(self, key: Hashable) -> None:
        """The layer is done with ``key``: it may be evicted again."""
        if key in self._dropped:  # its load failed: wait() forgot it and raised
            self._dropped.discard(key)
            return
        count = self._pins[key] - 1
        if count:
            self._pins[key] = count
        else:
            del self._pins[key]
        self.mover.released(self._slot_of[key])

    def clear(self) -> None:
        """Drop every unpinned resident expert (counts in stats stay)."""
        self.drain()
        for key in [k for k in self._slot_of if k not in self._pins]:
            self._free.append(self._evict(key))

    def drain(self) -> None:
        """Wait for every queued load (e.g. before timing stops, or before the cache goes away); a failed one
        that nobody is using is forgotten (its demand will load it again, and raise if it fails again)."""
        futures.wait(list(self._inflight.values()))
        for key, load in list(self._inflight.items()):
            if load.exception() is not None and key not in self._pins:
                log.warning("loading expert %s failed (%s); it will be loaded again when needed", key,
                            load.exception())
                self._free.append(self._forget(key))

    def close(self) -> None:
        """Stop the loader thread (after its queued loads) and close the store's files."""
        if self._loader is not None:
            self._loader.shutdown(wait=True)
            self._loader = None
        self.store.close()

    def check(self, idle: bool = True) -> None:
        """Raise CacheStateError unless the bookkeeping is consistent: every slot is free or holds exactly one
        expert, pins, loads and prefetches name resident experts, and (``idle``: between steps) nothing is pinned."""
        used = list(self._slot_of.values())
        problems = []
        if len(set(used)) != len(used) or set(used) & set(self._free) or \
                sorted(used + self._free) != list(range(self.num_slots)):
            problems.append(f"slots are not partitioned (resident {sorted(used)}, free {sorted(self._free)})")
        for name, keys in (("pinned", self._pins), ("loading", self._inflight), ("prefetched", self._prefetched),
                           ("warm-started", self._warmed)):
            if not set(keys) <= set(self._slot_of):
                problems.append(f"{name} experts {sorted(set(keys) - set(self._slot_of))} are not resident")
        if any(self._slot_of[k] not in self._experts for k in self._slot_of if k not in self._inflight):
            problems.append("a resident expert has no bound expert")
        if idle and (self._pins or self._dropped):
            problems.append(f"experts {sorted(self._pins) + sorted(self._dropped)} are still pinned between steps")
        if problems:
            raise CacheStateError("expert cache: " + "; ".join(problems))

    # -- internals -------------------------------------------------------------------------
    def _take_slot(self, protect: set[Hashable] = frozenset(), incoming: Hashable | None = None) -> int:
        if self._free:
            return self._free.pop()
        candidates = [k for k in self._slot_of if self._evictable(k) and k not in protect]
        if not candidates:
            raise RuntimeError("every cache slot is pinned; release experts before acquiring more")
        victim = self.policy.victim(candidates, incoming)
        self.stats.layer(victim[0]).evictions += 1
        return self._evict(victim)

    def _evict(self, key: Hashable) -> int:
        load = self._inflight.get(key)
        if load is not None and not load.done() and not load.cancel():
            # Victims are chosen as if every load were instant, so counts never depend on timing;
            # a victim still queued (a prefetch nobody used) is cancelled, one already loading is
            # waited for before its slot is reused (whether it succeeded does not matter: it goes).
            start = time.perf_counter()
            futures.wait([load])
            waited = time.perf_counter() - start
            self.stats.layer(key[0]).stall_time_s += waited
            self.evict_wait_s += waited
        return self._forget(key)

    def _forget(self, key: Hashable) -> int:
        """Drop ``key`` from residency (evicted, or its load failed); returns its slot, now unused."""
        self._inflight.pop(key, None)
        slot = self._slot_of.pop(key)
        self._experts.pop(slot, None)
        self.policy.on_evict(key)
        if key in self._prefetched:
            self._prefetched.discard(key)
            self.stats.layer(key[0]).prefetch_wasted += 1
        self._warmed.discard(key)
        return slot

    def _load(self, key: Key, slot: int, layer_stats) -> None:
        start = time.perf_counter()
        layout, nbytes = self.mover.load(key, slot)
        self._experts[slot] = layout.bind(self.mover.slots[slot])  # made here, off the compute thread when async
        layer_stats.bytes_loaded += nbytes
        layer_stats.load_time_s += time.perf_counter() - start


class LayerStep:
    """A layer step's experts, pinned together as far as the slots allow, handed out as they land.

    Experts already resident come first (in the order given), then the missing ones, whose loads
    queue at once (with async loads they overlap the compute of those already here). Every expert
    the cache can give without evicting one in use is reserved up front; when the step needs more
    experts than there are slots, each one handed back frees a slot for the next. Iterating yields
    ``(expert, Expert)``; the previous expert is released when the next is asked for.

    Use it in a ``with`` block (the forward does): however the step ends (an exception, a failed load, a
    KeyboardInterrupt in the compute) every pin it holds is released. A step that cannot place an expert
    it needs raises instead of skipping it.
    """

    def __init__(self, cache: ExpertCache, layer: int, needed: Iterable[int]) -> None:
        cache.policy.on_layer(layer)
        needed = list(needed)
        self.cache, self.layer = cache, layer
        self._order = deque([e for e in needed if (layer, e) in cache] + [e for e in needed if (layer, e) not in cache])
        self._held: deque[int] = deque()  # reserved (pinned) and not yet released, in hand-out order
        try:
            self._reserve()
        except BaseException:
            self.close()
            raise

    def _reserve(self) -> None:
        while self._order and self.cache.can_acquire((self.layer, self._order[0])):
            self.cache.reserve((self.layer, self._order[0]))
            self._held.append(self._order.popleft())

    def __enter__(self) -> LayerStep:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release every pin this step still holds (nothing when it ran to the end)."""
        while self._held:
            self.cache.release((self.layer, self._held.popleft()))

    def __iter__(self) -> Iterator[tuple[int, Expert]]:
        for batch in self.batches(limit=1):
            yield batch[0]

    def batches(self, limit: int | None = None) -> Iterator[list[tuple[int, Expert]]]:
        """The experts in hand-out order, as many at a time as have landed (at most ``limit``; at least one, waited
        for): a fused layer call takes each batch at once. A batch is released when the next is asked for."""
        try:
            while self._held:
                n = 1
                while n < len(self._held) and (limit is None or n < limit) and self.cache.landed(
                        (self.layer, self._held[n])):
                    n += 1
                yield [(e, self.cache.wait((self.layer, e))) for e in list(self._held)[:n]]
                for _ in range(n):
                    self.cache.release((self.layer, self._held.popleft()))
                self._reserve()
            if self._order:
                raise CacheStateError(f"layer {self.layer}: no free slot for expert {self._order[0]}: every slot "
                                      f"is pinned by an expert outside this step ({sorted(self.cache.pinned)})")
        finally:
            self.close()
