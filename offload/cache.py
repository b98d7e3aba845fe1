"""The fast-tier expert cache: a fixed number of equal slots on the compute device.

It owns residency, pinning and the counts; a policy (policies.py) only picks victims. An expert
that a layer is using is pinned and never evicted.

Loads are asynchronous when the cache has a loader thread (``async_loads=True``, which the
prefetcher needs): ``reserve`` books a slot and queues the load, ``wait`` blocks until its bytes
are there. All bookkeeping (residency, policy, counts) happens on the caller's thread; the loader
thread only moves bytes, one expert at a time, so one disk is read sequentially and the staging
buffers have one user. On CUDA the loader issues the copy on a copy stream and the compute stream
waits on that load's event. Victims are chosen as if loads were instant, so every count is
independent of timing; evicting an expert whose load is still in flight first waits for it.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch

from .experts import ExpertLayout, Key
from .policies import EvictionPolicy
from .stats import Stats
from .transfer import aligned_empty


class ExpertStore(Protocol):
    """A slow tier: produces an expert's bytes in a host buffer (reading into ``scratch`` if it must)."""

    raw_nbytes: int   # scratch bytes fetch() needs (0: it hands over its own buffer)
    dtype: torch.dtype  # dtype of the bytes it hands over

    def fetch(self, key: Key, scratch: torch.Tensor) -> tuple[torch.Tensor, ExpertLayout]: ...


class ExpertCache:
    """Fixed slots, exact hit/miss/eviction accounting, loads through a store."""

    def __init__(
        self,
        store: ExpertStore,
        num_slots: int,
        slot_layout: ExpertLayout,
        device: torch.device,
        policy: EvictionPolicy,
        stats: Stats,
        async_loads: bool = False,
    ) -> None:
        if num_slots < 1:
            raise ValueError("an expert cache needs at least one slot")
        self.store = store
        self.device = device
        self.policy = policy
        self.stats = stats
        self.num_slots = num_slots
        self.packed = slot_layout  # layout used when bytes must be cast into a slot
        self.compute_dtype = slot_layout.dtype
        cuda = device.type == "cuda"
        # A slot must hold either the raw bytes a store hands over (same dtype) or the packed cast.
        self.slot_nbytes = max(slot_layout.nbytes, store.raw_nbytes)
        if cuda:
            self._slots = torch.empty((num_slots, self.slot_nbytes), dtype=torch.uint8, device=device)
            # Two pinned staging buffers: the disk fills one while the other's copy is in flight.
            self._staging = [aligned_empty(store.raw_nbytes, pin=True) for _ in range(2)] if store.raw_nbytes else []
            self._staging_done = [None, None]
            self._copy_stream = torch.cuda.Stream(device)
            self._ready: dict[int, torch.cuda.Event] = {}
            self._freed: dict[int, torch.cuda.Event] = {}
        else:
            self._slots = aligned_empty(num_slots * self.slot_nbytes).view(num_slots, self.slot_nbytes)
            self._staging = [aligned_empty(store.raw_nbytes)] if store.raw_nbytes else []
        self._turn = 0
        self._free = list(range(num_slots - 1, -1, -1))
        self._slot_of: dict[Hashable, int] = {}
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # slot -> gate, up, down
        self._pins: dict[Hashable, int] = {}
        self._inflight: dict[Hashable, Future] = {}  # key -> its load, until a wait() sees it done
        self._prefetched: set[Hashable] = set()       # resident (or loading) by prefetch, not yet demanded
        self.evict_wait_s = 0.0                       # time spent waiting for a victim's load to land
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="offload-loader") if async_loads else None

    # -- queries ---------------------------------------------------------------------------
    @property
    def resident(self) -> set[Hashable]:
        return set(self._slot_of)

    @property
    def resident_nbytes(self) -> int:
        """Bytes of device memory the slots occupy: fixed by the budget, never exceeded."""
        return self._slots.numel()

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
    def acquire(self, key: Key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pin ``key`` (loading it on a miss) and return its gate, up and down matrices."""
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
        else:
            layer_stats.misses += 1
            start = time.perf_counter()
            self._insert(key, self._take_slot(), layer_stats)
            if self._loader is None:  # a synchronous load is a stall by definition
                layer_stats.stalls += 1
                layer_stats.stall_time_s += time.perf_counter() - start
            self.policy.on_access(key, hit=False)
        self._pins[key] = self._pins.get(key, 0) + 1

    def wait(self, key: Key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The matrices of a reserved expert, once its bytes are in the slot (a stall if they are not yet)."""
        load = self._inflight.pop(key, None)
        if load is not None:
            if not load.done():
                start = time.perf_counter()
                layer_stats = self.stats.layer(key[0])
                layer_stats.stalls += 1
                load.result()
                layer_stats.stall_time_s += time.perf_counter() - start
            load.result()  # re-raises a failed load here, on the caller's thread
        slot = self._slot_of[key]
        if self.device.type == "cuda" and slot in self._ready:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
        return self._views[slot]

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
        self._insert(key, self._take_slot(protected), layer_stats)
        self._prefetched.add(key)
        layer_stats.prefetch_issued += 1
        return True

    def expire_prefetches(self, layer: int, used: Iterable[int]) -> None:
        """``layer`` routed to ``used``: its other prefetched experts were wasted; evict them first."""
        used = set(used)
        for key in [k for k in self._prefetched if k[0] == layer and k[1] not in used]:
            self._prefetched.discard(key)
            self.stats.layer(layer).prefetch_wasted += 1
            self.policy.on_demote(key)

    def _insert(self, key: Key, slot: int, layer_stats) -> None:
        self._slot_of[key] = slot
        self.policy.on_insert(key)
        if self._loader is None:
            self._load(key, slot, layer_stats)
        else:
            self._inflight[key] = self._loader.submit(self._load, key, slot, layer_stats)

    def release(self, key: Hashable) -> None:
        """The layer is done with ``key``: it may be evicted again."""
        count = self._pins[key] - 1
        if count:
            self._pins[key] = count
        else:
            del self._pins[key]
        if self.device.type == "cuda":
            # The slot may be overwritten only after the compute that reads it has run.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._freed[self._slot_of[key]] = event

    def clear(self) -> None:
        """Drop every unpinned resident expert (counts in stats stay)."""
        self.drain()
        for key in [k for k in self._slot_of if k not in self._pins]:
            self._free.append(self._evict(key))

    def drain(self) -> None:
        """Wait for every queued load (e.g. before timing stops, or before the cache goes away)."""
        for load in list(self._inflight.values()):
            load.result()

    def close(self) -> None:
        """Stop the loader thread (after its queued loads)."""
        if self._loader is not None:
            self._loader.shutdown(wait=True)
            self._loader = None

    # -- internals -------------------------------------------------------------------------
    def _take_slot(self, protect: set[Hashable] = frozenset()) -> int:
        if self._free:
            return self._free.pop()
        candidates = [k for k in self._slot_of if self._evictable(k) and k not in protect]
        if not candidates:
            raise RuntimeError("every cache slot is pinned; release experts before acquiring more")
        victim = self.policy.victim(candidates)
        self.stats.layer(victim[0]).evictions += 1
        return self._evict(victim)

    def _evict(self, key: Hashable) -> int:
        load = self._inflight.pop(key, None)
        if load is not None and not load.done() and not load.cancel():
            # Victims are chosen as if every load were instant, so counts never depend on timing;
            # a victim still queued (a prefetch nobody used) is cancelled, one already loading is
            # waited for before its slot is reused.
            start = time.perf_counter()
            load.result()
            waited = time.perf_counter() - start
            self.stats.layer(key[0]).stall_time_s += waited
            self.evict_wait_s += waited
        slot = self._slot_of.pop(key)
        self.policy.on_evict(key)
        if key in self._prefetched:
            self._prefetched.discard(key)
            self.stats.layer(key[0]).prefetch_wasted += 1
        return slot

    def _load(self, key: Key, slot: int, layer_stats) -> None:
        start = time.perf_counter()
        dest = self._slots[slot]
        if self.device.type == "cuda":
            layout, nbytes = self._load_cuda(key, slot, dest)
        else:
            direct = self.store.raw_nbytes and self._same_dtype_tier()
            scratch = dest if direct else (self._staging[0] if self._staging else None)
            src, layout = self.store.fetch(key, scratch)
            layout, nbytes = self._place(src, layout, dest)
        self._views[slot] = layout.views(self._slots[slot])  # made here, off the compute thread when async
        layer_stats.bytes_loaded += nbytes
        layer_stats.load_time_s += time.perf_counter() - start

    def _same_dtype_tier(self) -> bool:
        # The disk tier can read straight into the slot only when no cast is needed afterwards.
        return self.store.dtype == self.compute_dtype

    def _place(self, src: torch.Tensor, layout: ExpertLayout, dest: torch.Tensor) -> tuple[ExpertLayout, int]:
        """Put fetched bytes into a slot: nothing if they are already there, one copy, or a cast."""
        if layout.dtype == self.compute_dtype:
            n = layout.nbytes
            if src.data_ptr() == dest.data_ptr():
                pass
            elif dest.device.type == "cpu" and src.device.type == "cpu":
                # One memcpy on this thread: torch's copy_ would split it across OpenMP threads,
                # whose barrier costs milliseconds per expert when other processes hold the cores.
                np.copyto(dest[:n].numpy(), src[:n].numpy())
            else:
                dest[:n].copy_(src[:n], non_blocking=True)
            return layout, n
        for have, want in zip(layout.parts, self.packed.parts):
            want.view(dest).copy_(have.view(src), non_blocking=True)
        return self.packed, layout.nbytes

    def _load_cuda(self, key: Key, slot: int, dest: torch.Tensor) -> tuple[ExpertLayout, int]:
        scratch = None
        if self._staging:
            self._turn ^= 1
            if self._staging_done[self._turn] is not None:
                self._staging_done[self._turn].synchronize()  # its previous copy must have left the buffer
            scratch = self._staging[self._turn]
        src, layout = self.store.fetch(key, scratch)
        with torch.cuda.stream(self._copy_stream):
            if slot in self._freed:
                self._copy_stream.wait_event(self._freed.pop(slot))
            layout, nbytes = self._place(src, layout, dest)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        self._ready[slot] = ready
        if scratch is not None:
            self._staging_done[self._turn] = ready
        return layout, nbytes
