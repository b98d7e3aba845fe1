"""Moving expert bytes between tiers.

* Disk tier: experts stay in the checkpoint's safetensors files and are read on demand. Reads
  bypass the page cache with O_DIRECT (aligned offsets, lengths and buffers) where the file
  system allows it, else drop the pages after each read with posix_fadvise(DONTNEED), so the
  expert budget bounds the memory the machine really uses and benchmarks measure the disk.
* RAM tier: every expert packed once into host memory (pinned when the device is CUDA).
* A store hands the cache an expert's bytes in a host buffer plus their layout; the cache
  then copies them into a slot (or they already are the slot, for the disk tier on CPU).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import TensorInfo
from .experts import ExpertLayout, Key, Part, packed_layout

log = logging.getLogger(__name__)

ALIGN = 4096           # O_DIRECT needs offsets, lengths and buffers aligned to the logical block size
MERGE_GAP = 1 << 16    # read across a small gap between an expert's tensors rather than issuing two reads

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


@dataclass(frozen=True)
class _Run:
    """Tensors of one expert that lie (nearly) back to back in one file: one read."""

    path: Path
    start: int
    end: int
    tensors: tuple[tuple[int, TensorInfo], ...]  # (part index: 0 gate, 1 up, 2 down; info)


def _runs(parts: tuple[TensorInfo, TensorInfo, TensorInfo]) -> list[_Run]:
    order = sorted(enumerate(parts), key=lambda it: (str(it[1].path), it[1].start))
    runs: list[list[tuple[int, TensorInfo]]] = []
    for idx, info in order:
        last = runs[-1][-1][1] if runs else None
        if last is not None and last.path == info.path and 0 <= info.start - last.end <= MERGE_GAP:
            runs[-1].append((idx, info))
        else:
            runs.append([(idx, info)])
    return [_Run(r[0][1].path, r[0][1].start, r[-1][1].end, tuple(r)) for r in runs]


class DiskExpertStore:
    """Experts left in the checkpoint files, read on demand with page-cache-bypassing reads."""

    def __init__(self, experts: Mapping[Key, tuple[TensorInfo, TensorInfo, TensorInfo]], reader: DirectReader) -> None:
        self.reader = reader
        self._runs = {key: _runs(parts) for key, parts in experts.items()}
        # Every run is read as an aligned span placed at an aligned offset of the destination buffer.
        self.raw_nbytes = max(
            sum(align_up(r.end) - align_down(r.start) for r in runs) for runs in self._runs.values()
        )
        self.files = sorted({r.path for runs in self._runs.values() for r in runs})
        self.dtype = next(iter(experts.values()))[0].dtype

    @property
    def tier(self) -> str:
        return "disk"

    def fetch(self, key: Key, scratch: torch.Tensor) -> tuple[torch.Tensor, ExpertLayout]:
        """Read the expert's bytes into ``scratch`` (aligned, >= raw_nbytes); return it with the layout."""
        parts: list[Part | None] = [None, None, None]
        cursor = 0
        for run in self._runs[key]:
            span = align_up(run.end) - align_down(run.start)
            skip = self.reader.read(run.path, run.start, run.end, scratch[cursor : cursor + span])
            for idx, info in run.tensors:
                parts[idx] = Part(cursor + skip + info.start - run.start, info.dtype, info.shape)
            cursor += span
        return scratch, ExpertLayout(*parts)  # type: ignore[arg-type]


class RamExpertStore:
    """Every expert packed once into host RAM in the compute dtype (pinned for fast CUDA copies)."""

    def __init__(
        self,
        experts: Mapping[Key, tuple[TensorInfo, TensorInfo, TensorInfo]],
        load: Callable[[TensorInfo], torch.Tensor],
        hidden: int,
        intermediate: int,
        dtype: torch.dtype,
        pin: bool,
        progress: Progress | None = None,
    ) -> None:
        self.layout = packed_layout(hidden, intermediate, dtype)
        self.dtype = dtype
        keys = sorted(experts)
        self._row = {key: i for i, key in enumerate(keys)}
        self._packed = torch.empty((len(keys), self.layout.nbytes), dtype=torch.uint8, pin_memory=pin)
        for i, key in enumerate(keys):
            row = self._packed[i]
            for part, info in zip(self.layout.parts, experts[key]):
                part.view(row).copy_(load(info))
            if progress:
                progress(i + 1, len(keys))

    @property
    def tier(self) -> str:
        return "ram"

    raw_nbytes = 0  # never needs a scratch buffer

    def fetch(self, key: Key, scratch: torch.Tensor | None) -> tuple[torch.Tensor, ExpertLayout]:
        return self._packed[self._row[key]], self.layout
