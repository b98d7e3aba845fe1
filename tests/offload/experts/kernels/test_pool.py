"""offload/experts/kernels/pool.py: every row written exactly once, whatever the thread count; errors reach the
caller; the pool keeps working after one."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from offload.experts.kernels import pool as P


@pytest.mark.parametrize("rows, parts", [(0, 2), (5, 2), (16, 2), (100, 3), (4096, 2), (33, 4)])
def test_split_covers_every_row_once(rows, parts):
    ranges = P.split(rows, parts)
    assert len(ranges) == parts
    covered = [r for lo, hi in ranges for r in range(lo, hi)]
    assert covered == list(range(rows))
    assert all(lo % P.ROW_ALIGN == 0 for lo, hi in ranges if hi > lo)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_run_writes_every_row_once(threads):
    pool = P.Pool(threads)
    for rows in (1, 31, 32, 1000, 4097):
        hits = np.zeros(rows, np.int64)
        lock = threading.Lock()

        def job(lo, hi, hits=hits, lock=lock):
            with lock:
                hits[lo:hi] += 1

        for _ in range(20):  # back to back: workers spinning between jobs
            pool.run(job, rows)
        assert (hits == 20).all()


def test_a_failing_job_raises_in_the_caller_and_the_pool_goes_on():
    pool = P.Pool(2)

    def job(lo, hi):
        if lo > 0:
            raise ValueError("worker part failed")

    with pytest.raises(ValueError, match="worker part failed"):
        pool.run(job, 1000)
    seen = []
    pool.run(lambda lo, hi: seen.append((lo, hi)), 1000)
    assert sorted(seen) == P.split(1000, 2)


def test_sleeping_workers_wake_for_the_next_job():
    pool = P.Pool(2)
    pool.run(lambda lo, hi: None, 1000)
    threading.Event().wait(0.2)  # far past the spin window: the worker sleeps
    seen = []
    pool.run(lambda lo, hi: seen.append(lo), 1000)
    assert sorted(seen) == [0, 512]


@pytest.mark.parametrize("spins", [0, 1])
def test_a_worker_without_a_spin_budget_still_runs_every_job(spins):
    """With no spin budget a worker goes back to sleep at once; a job posted meanwhile must still run (it once
    never did: the worker found the new job in Python, returned to numba, left before looking at it, and the
    caller waited forever). Each job runs in a thread with a deadline, so a hang fails instead of hanging."""
    import torch

    from offload.experts.kernels import jobs

    pool = P.Pool(2)
    pool.spin(spins)
    w, x = torch.randn(256, 64), torch.randn(1, 64)
    y = torch.empty(1, 256)
    desc = jobs.weight_base(jobs.F32, 256, 64, w.data_ptr())
    desc[jobs.TOKENS], desc[jobs.X], desc[jobs.XKIND], desc[jobs.Y], desc[jobs.YKIND] = (
        1, x.data_ptr(), jobs.F32, y.data_ptr(), jobs.F32)

    def jobs_back_to_back():
        for _ in range(200):
            pool.run_job(desc)

    runner = threading.Thread(target=jobs_back_to_back, daemon=True)
    runner.start()
    runner.join(120)
    assert not runner.is_alive(), "the pool hung"
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)
