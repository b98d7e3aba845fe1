"""One thread pool for the decode kernels: the caller's thread plus ``threads - 1`` workers, splitting rows.

Why not torch's or numba's threading: torch ships its own libgomp and numba's ``omp`` layer loads the system
one; two spinning OpenMP teams on 2 cores stalled calls by 12-16 ms, and numba's ``workqueue`` layer started
its threads per call (266 against 188 us, shared/NOTES.md). Here a worker is a plain thread inside a numba
function (``_serve``) that never holds the GIL: it spins on a generation counter, runs its rows of the posted
job descriptor (jobs.py) and adds itself to a done counter; after a number of idle pauses set by the step it
serves it returns to Python and sleeps on a condition variable, so it never starves torch's threads for long. The
next kernel call therefore starts on every thread within a microsecond.

How long to spin: a decode token's gaps between kernel calls (attention, sampling, the next token's embedding) last
up to a few milliseconds. Spinning ``SPINS`` (~1.3 ms) the worker slept 1.1-1.6 times per token of the bench model
and each wake-up (condition variable, then the GIL) cost a few hundred microseconds: 56 against 65 tok/s with
``DECODE_SPINS`` (~10 ms, no sleeps; median of 6 alternating runs in one process, Q4_0 GGUF, an ad-hoc A/B). So a
decode step raises the budget and a prefill step lowers it again, giving torch's threads both cores for its GEMMs.

A Python callable can be run too (tests, benchmarks): the worker then leaves numba to call it, and pays the GIL.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import numpy as np
import psutil
import torch
from numba import njit

from offload.experts.kernels import cache, intrinsics, jobs

GENERATION, DONE, PYTHON_JOB, SPIN = 0, 8, 16, 24  # int64 slots of the control array, a cache line apart
SPINS = 20_000            # pause instructions before a worker sleeps: ~66 ns each here, 1.3 ms in all
DECODE_SPINS = 150_000    # the same while decoding: ~10 ms, longer than any gap between a token's kernel calls
ROW_ALIGN = 16            # rows per part are a multiple of this: parts never share a cache line of output
DECODE_TOKENS = 16        # a step of at most this many tokens runs as decode (decode_step): the kernels' range

Job = Callable[[int, int], None]  # (first row, end row): writes those rows of its output


@njit(cache=True, nogil=True, inline="always")
def _part(rows, parts, index):
    step = -(-rows // parts)
    step = max(-(-step // ROW_ALIGN) * ROW_ALIGN, ROW_ALIGN)
    return min(index * step, rows), min((index + 1) * step, rows)


@njit(cache=True, nogil=True)
def _serve(ctl, desc, index, parts, seen):
    """A worker's loop: run its part of each posted descriptor job; return the generation seen when idle for
    ctl[SPIN] pauses, or minus it when the job is a Python callable (the worker runs it in Python). A posted job is
    always looked at before the budget is: with a budget of 0 the worker would otherwise return at once, find the
    new generation again in Python and never run the job (the caller then waits forever)."""
    idle = 0
    while True:
        now = intrinsics.load_acquire(ctl, GENERATION)
        if now == seen:
            if idle >= intrinsics.load_acquire(ctl, SPIN):
                return seen
            intrinsics.cpu_relax()
            idle += 1
            continue
        seen = now
        if intrinsics.load_acquire(ctl, PYTHON_JOB) != 0:
            return -seen
        lo, hi = _part(desc[jobs.N], parts, index)
        if hi > lo:
            jobs.run(desc, lo, hi)
        intrinsics.fetch_add(ctl, DONE, 1)
        idle = 0


@njit(cache=True, nogil=True)
def _lead(ctl, desc, parts, target):
    """The caller's side of a posted descriptor job: run part 0, wait for the workers' parts."""
    lo, hi = _part(desc[jobs.N], parts, 0)
    if hi > lo:
        jobs.run(desc, lo, hi)
    while intrinsics.load_acquire(ctl, DONE) < target:
        intrinsics.cpu_relax()


@njit(cache=True, nogil=True)
def _post(ctl, generation, python_job):
    intrinsics.store_release(ctl, PYTHON_JOB, python_job)
    intrinsics.store_release(ctl, GENERATION, generation)


@njit(cache=True, nogil=True)
def _post_spin(ctl, pauses):
    intrinsics.store_release(ctl, SPIN, pauses)


@njit(cache=True, nogil=True)
def _wait_done(ctl, target):
    while intrinsics.load_acquire(ctl, DONE) < target:
        intrinsics.cpu_relax()


@njit(cache=True, nogil=True)
def _finish(ctl):
    intrinsics.fetch_add(ctl, DONE, 1)


def split(rows: int, parts: int) -> list[tuple[int, int]]:
    """``rows`` cut into ``parts`` contiguous ranges, multiples of ROW_ALIGN except the last (some may be empty)."""
    return [_part(rows, parts, i) for i in range(parts)]


class Pool:
    """The caller plus ``threads - 1`` daemon workers; one job at a time (a lock serializes callers)."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, int(threads))
        self._ctl = np.zeros(32, dtype=np.int64)
        self._ctl[SPIN] = SPINS
        self._desc = np.zeros(jobs.FIELDS, dtype=np.int64)
        self._generation = 0
        self._python_job: Job | None = None
        self._errors: list[BaseException] = []
        self._sleeping = 0
        self._cond = threading.Condition()
        self._lock = threading.Lock()
        self.workers = [threading.Thread(target=self._serve, args=(i + 1,), daemon=True, name=f"offload-kernel-{i}")
                        for i in range(self.threads - 1)]
        for w in self.workers:
            w.start()

    def run_job(self, desc: np.ndarray) -> None:
        """The kernel call ``desc`` (jobs.py) over all its rows, split between the threads."""
        rows = int(desc[jobs.N])
        if self.threads == 1 or rows < 2 * ROW_ALIGN:
            jobs.run(desc, 0, rows)
            return
        with self._lock:
            self._desc[:] = desc
            self._generation += 1
            _post(self._ctl, self._generation, 0)
            self._wake()  # after the post: a woken worker checks the generation before sleeping again
            _lead(self._ctl, self._desc, self.threads, self._generation * (self.threads - 1))

    def run(self, job: Job, rows: int) -> None:
        """A Python callable job(lo, hi) over all ``rows`` (each worker takes the GIL to call it)."""
        if self.threads == 1 or rows < 2 * ROW_ALIGN:
            job(0, rows)
            return
        with self._lock:
            self._python_job = job
            self._desc[jobs.N] = rows
            self._generation += 1
            target = self._generation * (self.threads - 1)
            _post(self._ctl, self._generation, 1)
            self._wake()
            try:
                job(*_part(rows, self.threads, 0))
            finally:
                _wait_done(self._ctl, target)  # the workers' rows must be written before anyone reads them
            if self._errors:
                raise self._errors.pop()

    def spin(self, pauses: int) -> None:
        """How long an idle worker spins before it sleeps, from now on (DECODE_SPINS while decoding)."""
        if self._ctl[SPIN] != pauses:
            _post_spin(self._ctl, pauses)

    def _wake(self) -> None:
        if self._sleeping:
            with self._cond:
                self._cond.notify_all()

    def _serve(self, index: int) -> None:
        seen = 0
        while True:
            now = _serve(self._ctl, self._desc, index, self.threads, seen)
            if now < 0:  # a Python job
                seen = -now
                self._run_python(index)
                continue
            seen = now
            with self._cond:  # idle: sleep until the next job rather than take the core from torch
                self._sleeping += 1
                self._cond.wait_for(lambda seen=seen: self._ctl[GENERATION] != seen)
                self._sleeping -= 1
            # the new job is picked up by _serve (it sees a generation it has not seen)

    def _run_python(self, index: int) -> None:
        try:
            lo, hi = _part(int(self._desc[jobs.N]), self.threads, index)
            if hi > lo:
                self._python_job(lo, hi)  # type: ignore[misc]
        except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
            self._errors.append(e)
        finally:
            _finish(self._ctl)


_pool: Pool | None = None
_pool_lock = threading.Lock()


def pool(threads: int | None = None) -> Pool:
    """The process's pool; ``threads`` (when given and different) replaces it (the old one's workers stay asleep)."""
    global _pool
    with _pool_lock:
        if _pool is None or (threads is not None and threads != _pool.threads):
            _pool = Pool(threads if threads is not None else default_threads())
        return _pool


def use_threads(threads: int = 0) -> int:
    """Size the kernel pool and torch's intra-op threads alike (0: physical cores); returns the count.

    One number for both: decode runs in our pool and torch's threads only wake for prefill's GEMMs and the small
    ops between, so the two never run at once and neither may outnumber the cores.
    """
    threads = threads or default_threads()
    pool(threads)
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def decode_step(tokens: int) -> Iterator[None]:
    """Around a forward step: when it is small enough for the kernels (decode), torch runs on one thread.

    torch's OpenMP workers spin for a while after each parallel op; on 2 cores one spinning beside the pool's worker
    took a core from every kernel call that followed (a resident token ran at 10 tok/s on the 1.5 GB bench model,
    against 30 with torch on one thread). Decode's torch ops (router, attention over a short query, norms) are small
    enough that one thread loses nothing; prefill keeps all of torch's threads for its GEMMs.
    """
    if tokens > DECODE_TOKENS:
        pool().spin(SPINS)
        yield
        return
    pool().spin(DECODE_SPINS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def default_threads() -> int:
    """Physical cores: a second hyperthread on the same core adds no memory bandwidth to a GEMV."""
    return psutil.cpu_count(logical=False) or 1


cache.tie(globals())
