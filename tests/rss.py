"""Peak resident memory of this process over a block: Linux resets VmHWM to the current RSS when "5" is written
to /proc/self/clear_refs, so a test can bound what one call costs (an error must arrive before the memory does).
The bound is on the rise over the block's start: a pytest worker already holds whatever earlier tests left."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _kib(field: str, pid: int | str = "self") -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1))


def rss_mib(pid: int | str = "self") -> float:
    return _kib("VmRSS", pid) / 1024


def peak_rss_mib(pid: int | str = "self") -> float:
    return _kib("VmHWM", pid) / 1024


@contextmanager
def peak_rss() -> Iterator[list[float]]:
    """``with peak_rss() as rise:`` ... then ``rise[0]``: the most MiB resident at once inside the block, less what
    was resident when it began."""
    Path("/proc/self/clear_refs").write_text("5")
    start = rss_mib()
    out: list[float] = []
    try:
        yield out
    finally:
        out.append(peak_rss_mib() - start)
