"""Moving expert bytes between tiers.

* Disk tier: experts stay in the checkpoint's safetensors files and are read on demand. Reads
  bypass the page cache with O_DIRECT (aligned offsets, lengths and buffers) where the file
  system allows it, else drop the pages after each read with posix_fadvise(DONTNEED), so the
  expert budget bounds the memory the machine really uses and benchmarks measure the disk.
* RAM tier: every expert packed once into host memory (pinned when the device is CUDA).
* A store hands over an expert's bytes in a host buffer plus their layout; a mover (one per
  device type) owns the cache's slot memory and puts those bytes into a slot: nothing when they
  were read straight into it, one copy when they are already in the slot's format, else a
  conversion by the slot's layout. The CUDA mover copies through two pinned staging buffers on
  a copy stream, with an event per slot so that compute waits for its bytes and a slot is
  overwritten only after the compute that read it has finished.
"""

from __future__ import annotations

import errno
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from offload.checkpoint.tensors import TensorInfo, read_runs
from offload.experts.layouts import ExpertLayout, Key, Part, SlotLayout
from offload.registry import lookup

log = logging.getLogger(__name__)

ALIGN = 4096           # O_DIRECT needs offsets, lengths and buffers aligned to the logical block size
OVER_SLACK = 0.125     # a slot read into and finished in place may be this much larger than a converted one

Progress = Callable[[int, int], None]


def align_down(x: int) -> int:
    return x - x % ALIGN


def align_up(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


def aligned_empty(nbytes: int, pin: bool = False) -> torch.Tensor:
    """A uint8 host buffer whose first byte is ALIGN-aligned (torch's allocator only promises 64)."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    start = (-raw.data_ptr()) % ALIGN
    return raw[start : start + nbytes]


class DirectReader:
    """Reads byte ranges of files without leaving them in the page cache.

    mode "direct" opens with O_DIRECT; "fadvise" reads normally and drops the pages after each
    read; "plain" is the portable fallback. "auto" picks the first that works for each file.
    """

    def __init__(self, mode: str = "auto") -> None:
        self.mode = mode
        self._fds: dict[Path, tuple[int, str]] = {}
        self.requests = 0  # read calls issued to the kernel (what a disk pays latency for), for benchmarks

    def _open(self, path: Path) -> tuple[int, str]:
        if path in self._fds:
            return self._fds[path]
        modes = ["direct", "fadvise", "plain"] if self.mode == "auto" else [self.mode]
        for mode in modes:
            if mode == "direct" and not hasattr(os, "O_DIRECT"):
                continue
            if mode == "fadvise" and not hasattr(os, "posix_fadvise"):
                continue
            flags = os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0)
            try:
                fd = os.open(path, flags)
            except OSError as e:
                if e.errno == errno.EINVAL:  # e.g. tmpfs refuses O_DIRECT
                    continue
                raise
            if mode == "direct" and not self._direct_works(fd):
                os.close(fd)
                continue
            self._fds[path] = (fd, mode)
            log.debug("reading %s with %s I/O", path, mode)
            return fd, mode
        raise OSError(f"cannot open {path}")

    @staticmethod
    def _direct_works(fd: int) -> bool:
        probe = aligned_empty(ALIGN)
        try:
            os.preadv(fd, [memoryview(probe.numpy())], 0)
            return True
        except OSError:
            return False

    def mode_of(self, path: Path) -> str:
        return self._open(path)[1]

    def read(self, path: Path, start: int, end: int, dest: torch.Tensor) -> int:
        """Read file bytes [start, end) into ``dest`` (aligned host uint8); return where ``start`` landed.

        With O_DIRECT the aligned span around the range is read, so ``dest`` must hold
        ``align_up(end) - align_down(start)`` bytes; the other modes read the range exactly.
        """
        fd, mode = self._open(path)
        if mode == "direct":
            lo, hi, skip = align_down(start), align_up(end), start - align_down(start)
        else:
            lo, hi, skip = start, end, 0
        view = memoryview(dest.numpy())[: hi - lo]
        done = 0
        while done < hi - lo:
            n = os.preadv(fd, [view[done:]], lo + done)
            self.requests += 1
            if n == 0:
                break  # end of file inside the last aligned block
            done += n
        if done < end - lo:
            raise OSError(f"short read from {path}: wanted bytes up to {end}, got {lo + done}")
        if mode == "fadvise":
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
        return skip

    def drop_cache(self, paths: Iterable[Path]) -> None:
        """Evict whole files from the page cache (benchmarks call it to start from a cold disk)."""
        if not hasattr(os, "posix_fadvise"):
            return
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def close(self) -> None:
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()


# an expert and the parts of its tensors (in the checkpoint format's order) -> its layout (a GGUF file's types, and
# so its layouts, may differ per layer)
LayoutOf = Callable[[Key, Sequence[Part]], ExpertLayout]
HostLayoutOf = Callable[[Key], ExpertLayout]  # an expert -> its layout in the RAM tier


class DiskExpertStore:
    """Experts left in the checkpoint files, read on demand with page-cache-bypassing reads.

    An expert is its checkpoint tensors, in the order its format lists them; tensors that lie
    (nearly) back to back are read in one go, and ``layout_of`` turns their places in the buffer
    into the expert's layout in the checkpoint's format.
    """

    def __init__(self, experts: Mapping[Key, Sequence[TensorInfo]], reader: DirectReader, layout_of: LayoutOf) -> None:
        self.reader = reader
        self.layout_of = layout_of
        self._runs = {key: read_runs(tensors) for key, tensors in experts.items()}
        # Every run is read as an aligned span placed at an aligned offset of the destination buffer.
        self.raw_nbytes = max(
            sum(align_up(r.end) - align_down(r.start) for r in runs) for runs in self._runs.values()
        )
        self.files = sorted({r.path for runs in self._runs.values() for r in runs})
        self._count = len(next(iter(experts.values())))
        # The checkpoint's formats (offsets vary per expert; a GGUF K-quant mix has one per distinct layer type):
        # tell a mover whether a read can land in a slot as is.
        self.native_formats = _distinct(layout_of(key, [Part(0, t.stored_dtype, t.stored_shape) for t in tensors])
                                        for key, tensors in experts.items())

    @property
    def tier(self) -> str:
        return "disk"

    def close(self) -> None:
        """Close the checkpoint files (a later fetch reopens them)."""
        self.reader.close()

    def fetch(self, key: Key, scratch: torch.Tensor) -> tuple[torch.Tensor, ExpertLayout]:
        """Read the expert's bytes into ``scratch`` (aligned, >= raw_nbytes); return it with the layout."""
        parts: list[Part | None] = [None] * self._count
        cursor = 0
        for run in self._runs[key]:
            span = align_up(run.end) - align_down(run.start)
            skip = self.reader.read(run.path, run.start, run.end, scratch[cursor : cursor + span])
            for idx, info in run.tensors:
                parts[idx] = Part(cursor + skip + info.start - run.start, info.stored_dtype, info.stored_shape)
            cursor += span
        return scratch, self.layout_of(key, parts)  # type: ignore[arg-type]


def _distinct(layouts: Iterable[ExpertLayout]) -> tuple[ExpertLayout, ...]:
    """One layout of each format among ``layouts``."""
    out: list[ExpertLayout] = []
    for layout in layouts:
        if not any(layout.same_format(have) for have in out):
            out.append(layout)
    return tuple(out)


def ram_tier_nbytes(keys: Iterable[Key], layout_of: HostLayoutOf) -> int:
    """Bytes of the RAM tier holding ``keys`` in their host layouts (each expert's bytes start 64-aligned)."""
    return sum(_aligned64(layout_of(key).nbytes) for key in keys)


def _aligned64(n: int) -> int:
    return -(-n // 64) * 64


class RamExpertStore:
    """Every expert held in host RAM in its host layout (pinned for fast CUDA copies).

    Filled once from a source store (the checkpoint on disk): each expert is read and converted into ``layout_of``
    its key (cast to the compute dtype, repacked for a quantized kernel, or a GGUF layer's own blocks), back to back
    in one buffer, so a miss is one memcpy or the slot's conversion and never a read.
    """

    raw_nbytes = 0  # never needs a scratch buffer

    def __init__(self, source: DiskExpertStore, keys: Sequence[Key], layout_of: HostLayoutOf, pin: bool,
                 progress: Progress | None = None) -> None:
        order = sorted(keys)
        self._layouts = {key: layout_of(key) for key in order}
        self.native_formats = _distinct(self._layouts.values())
        self._start, offset = {}, 0
        for key in order:
            self._start[key], offset = offset, offset + _aligned64(self._layouts[key].nbytes)
        self._packed = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
        scratch = aligned_empty(source.raw_nbytes)
        for i, key in enumerate(order):
            src, src_layout = source.fetch(key, scratch)
            self._layouts[key].convert_from(src_layout, src, self.fetch(key, None)[0])
            if progress:
                progress(i + 1, len(keys))
        source.close()  # every expert is in RAM now: nothing reads the files again

    def close(self) -> None:
        """Nothing to close: the experts are in RAM."""

    @property
    def tier(self) -> str:
        return "ram"

    def fetch(self, key: Key, scratch: torch.Tensor | None) -> tuple[torch.Tensor, ExpertLayout]:
        layout, start = self._layouts[key], self._start[key]
        return self._packed[start : start + layout.nbytes], layout


# -- movers: the slot memory of the cache and how bytes get into it --------------------------------------


class ExpertStore(Protocol):
    """A slow tier: produces an expert's bytes in a host buffer (reading into ``scratch`` if it must)."""

    raw_nbytes: int                      # scratch bytes fetch() needs (0: it hands over its own buffer)
    native_formats: tuple[ExpertLayout, ...]  # the formats of the bytes it hands over (offsets may differ per
    #                                           expert): one, or one per distinct GGUF layer type

    def fetch(self, key: Key, scratch: torch.Tensor | None) -> tuple[torch.Tensor, ExpertLayout]: ...

    def close(self) -> None: ...  # release open files (the cache's close() calls it)


class Mover(ABC):
    """Owns ``num_slots`` equal slots of device memory and puts a store's bytes into them.

    ``load`` runs on the cache's loader thread (or the caller's, without one); ``ready`` and
    ``released`` run on the compute thread around each use of a slot.
    """

    def __init__(self, store: ExpertStore, num_slots: int, slot_layout: SlotLayout, device: torch.device) -> None:
        self.store = store
        self.slot_layout = slot_layout  # what bytes are converted into when they are not in it already
        self.device = device
        self.direct = reads_into_slot(store, slot_layout, device)
        self.over = not self.direct and laid_over_read(store, slot_layout, device)  # read in, finish in place
        self.slot_nbytes = slot_nbytes(store, slot_layout, device)
        self.slots = self._allocate(num_slots)

    @abstractmethod
    def _allocate(self, num_slots: int) -> torch.Tensor:
        """The slot memory, [num_slots, slot_nbytes] uint8 on the device."""

    @abstractmethod
    def load(self, key: Key, slot: int) -> tuple[ExpertLayout, int]:
        """Bring ``key``'s bytes into ``slot``; returns the layout they have there and the bytes fetched."""

    def ready(self, slot: int) -> None:
        """The compute about to read ``slot`` must see its bytes (CUDA: wait for the copy's event)."""

    def released(self, slot: int) -> None:
        """The compute that read ``slot`` is queued; the slot may be refilled after it (CUDA: record an event)."""

    def _place(self, src: torch.Tensor, layout: ExpertLayout, dest: torch.Tensor) -> tuple[ExpertLayout, int]:
        """Put fetched bytes into a slot: nothing if they are already there, one copy, or a conversion."""
        if self.slot_layout.holds(layout):
            if src.data_ptr() != dest.data_ptr():
                self._copy(dest[: layout.nbytes], src[: layout.nbytes])
            return layout, layout.nbytes
        if self.over and src.data_ptr() == dest.data_ptr():  # read into the slot: derive the rest beside the bytes
            laid = self.slot_layout.over(layout, self.store.raw_nbytes)
            laid.convert_from(layout, dest, dest)
            return laid, layout.nbytes
        self.slot_layout.convert_from(layout, src, dest)
        return self.slot_layout, layout.nbytes

    def _copy(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        dest.copy_(src, non_blocking=True)


class CpuMover(Mover):
    """Slots in aligned host memory; the disk tier reads straight into a slot when no conversion is needed."""

    def _allocate(self, num_slots: int) -> torch.Tensor:
        needs_staging = self.store.raw_nbytes and not (self.direct or self.over)
        self._staging = aligned_empty(self.store.raw_nbytes) if needs_staging else None
        return aligned_empty(num_slots * self.slot_nbytes).view(num_slots, self.slot_nbytes)

    def load(self, key: Key, slot: int) -> tuple[ExpertLayout, int]:
        dest = self.slots[slot]
        src, layout = self.store.fetch(key, dest if self.direct or self.over else self._staging)
        return self._place(src, layout, dest)

    def _copy(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        # One memcpy on this thread: torch's copy_ would split it across OpenMP threads, whose
        # barrier costs milliseconds per expert when other processes hold the cores.
        np.copyto(dest.numpy(), src.numpy())


class CudaMover(Mover):
    """Slots in device memory, filled on a copy stream through two pinned staging buffers.

    The disk fills one staging buffer while the other's copy is in flight; the compute stream
    waits on a slot's ready event, and a copy into a slot waits on the event recorded when the
    compute that last read it was queued.
    """

    def _allocate(self, num_slots: int) -> torch.Tensor:
        raw = self.store.raw_nbytes
        self._staging = [aligned_empty(raw, pin=True) for _ in range(2)] if raw else []
        self._staging_done: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._copy_stream = torch.cuda.Stream(self.device)
        self._ready: dict[int, torch.cuda.Event] = {}
        self._freed: dict[int, torch.cuda.Event] = {}
        return torch.empty((num_slots, self.slot_nbytes), dtype=torch.uint8, device=self.device)

    def load(self, key: Key, slot: int) -> tuple[ExpertLayout, int]:
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
            placed = self._place(src, layout, self.slots[slot])
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        self._ready[slot] = ready
        if scratch is not None:
            self._staging_done[self._turn] = ready
        return placed

    def ready(self, slot: int) -> None:
        if slot in self._ready:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])

    def released(self, slot: int) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._freed[slot] = event


MOVERS: dict[str, type[Mover]] = {"cpu": CpuMover, "cuda": CudaMover}


def reads_into_slot(store: ExpertStore, slot_layout: SlotLayout, device: torch.device) -> bool:
    """Whether a fetch can land in the slot as it is: a host slot and bytes already in the slot's format."""
    return (device.type == "cpu" and bool(store.raw_nbytes)
            and all(slot_layout.holds(native) for native in store.native_formats))


def _laid_over(store: ExpertStore, slot_layout: SlotLayout) -> list[ExpertLayout | None]:
    return [slot_layout.over(native, store.raw_nbytes) for native in store.native_formats]


def laid_over_read(store: ExpertStore, slot_layout: SlotLayout, device: torch.device) -> bool:
    """Whether a fetch lands in a host slot and is finished there: the slot layout computes from the read bytes
    where they lie (ExpertLayout.over) and derives only the rest after them, converting no codes. Only where that
    slot is at most OVER_SLACK larger than a converted one: the read also brings the checkpoint's own scales and
    4 KiB of alignment at each end, which for small experts would cost more slots than the conversion costs time."""
    if device.type != "cpu" or not store.raw_nbytes:
        return False
    laid = _laid_over(store, slot_layout)
    return all(x is not None for x in laid) and max(x.nbytes for x in laid) <= (1 + OVER_SLACK) * slot_layout.nbytes


def slot_nbytes(store: ExpertStore, slot_layout: SlotLayout, device: torch.device) -> int:
    """A slot holds the slot layout's bytes, or, where reads land in it directly, the aligned raw read (and what
    a layout laid over it derives after it)."""
    if reads_into_slot(store, slot_layout, device):
        return max(slot_layout.nbytes, store.raw_nbytes)
    if laid_over_read(store, slot_layout, device):
        return max(slot_layout.nbytes, *(laid.nbytes for laid in _laid_over(store, slot_layout)))
    return slot_layout.nbytes


def make_mover(store: ExpertStore, num_slots: int, slot_layout: SlotLayout, device: torch.device) -> Mover:
    """The mover for ``device``'s type."""
    return lookup(MOVERS, device.type, "device type for expert slots")(store, num_slots, slot_layout, device)
