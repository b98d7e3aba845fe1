"""The fast-tier expert cache: a fixed number of equal slots on the compute device.

It owns residency, pinning and the counts; a policy (policies.py) only picks victims. An expert
that a layer is using is pinned and never evicted. On CUDA a load is issued on a copy stream and
the compute stream waits on its event, so loads overlap compute; on CPU loads are synchronous.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Protocol

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
        self._layout: dict[int, ExpertLayout] = {}
        self._pins: dict[Hashable, int] = {}

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

    def can_acquire(self, key: Hashable) -> bool:
        """True when acquiring ``key`` now would not need to evict a pinned expert."""
        return key in self._slot_of or bool(self._free) or any(k not in self._pins for k in self._slot_of)

    # -- use -------------------------------------------------------------------------------
    def acquire(self, key: Key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pin ``key`` (loading it on a miss) and return its gate, up and down matrices."""
        layer_stats = self.stats.layer(key[0])
        slot = self._slot_of.get(key)
        if slot is not None:
            layer_stats.hits += 1
            self.policy.on_access(key, hit=True)
        else:
            layer_stats.misses += 1
            slot = self._take_slot(layer_stats)
            self._load(key, slot, layer_stats)
            self._slot_of[key] = slot
            self.policy.on_insert(key)
            self.policy.on_access(key, hit=False)
        self._pins[key] = self._pins.get(key, 0) + 1
        if self.device.type == "cuda" and slot in self._ready:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
        return self._layout[slot].views(self._slots[slot])

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
        for key in [k for k in self._slot_of if k not in self._pins]:
            self._free.append(self._evict(key))

    # -- internals -------------------------------------------------------------------------
    def _take_slot(self, layer_stats) -> int:
        if self._free:
            return self._free.pop()
        candidates = [k for k in self._slot_of if k not in self._pins]
        if not candidates:
            raise RuntimeError("every cache slot is pinned; release experts before acquiring more")
        victim = self.policy.victim(candidates)
        self.stats.layer(victim[0]).evictions += 1
        return self._evict(victim)

    def _evict(self, key: Hashable) -> int:
        slot = self._slot_of.pop(key)
        self.policy.on_evict(key)
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
        self._layout[slot] = layout
        layer_stats.bytes_loaded += nbytes
        layer_stats.load_time_s += time.perf_counter() - start

    def _same_dtype_tier(self) -> bool:
        # The disk tier can read straight into the slot only when no cast is needed afterwards.
        return self.store.dtype == self.compute_dtype

    def _place(self, src: torch.Tensor, layout: ExpertLayout, dest: torch.Tensor) -> tuple[ExpertLayout, int]:
        """Put fetched bytes into a slot: nothing if they are already there, one copy, or a cast."""
        if layout.dtype == self.compute_dtype:
            if src.data_ptr() != dest.data_ptr():
                dest[: layout.nbytes].copy_(src[: layout.nbytes], non_blocking=True)
            return layout, layout.nbytes
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
