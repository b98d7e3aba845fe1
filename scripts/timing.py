"""Torch-free measurement helpers shared by the benchmarks: a token clock, how busy the machine was, and this
process's storage reads, page faults and RSS.

Nothing here imports torch or offload (whose package imports torch): a worker that must not carry torch's memory,
such as llama.cpp's inside a memory cgroup (scripts/llamacpp_worker.py), uses these as the torch workers do.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from pathlib import Path


class TokenClock:
    """A streamer (transformers' put/end protocol) that timestamps each new token.

    put() gets the prompt first, then one call per generated token; decode time runs from the first
    new token (the end of prefill) to the last, over new_tokens - 1 tokens, for both runtimes.
    ``on_first`` runs once at the first new token (to snapshot cache counters after prefill); ``sync``
    waits for the device before each timestamp.
    """

    def __init__(self, on_first: Callable[[], None] | None = None, sync: Callable[[], None] = lambda: None) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False
        self._on_first = on_first
        self._sync = sync

    def put(self, value) -> None:
        self._sync()  # on CUDA the token's kernels may still be running: its time is when they are done
        now = time.perf_counter()
        if not self._prompt_seen:
            self._prompt_seen = True
            self.start = now
            return
        self.times.append(now)
        self.tokens.extend(value.reshape(-1).tolist())
        if len(self.times) == 1 and self._on_first:
            self._on_first()

    def end(self) -> None:
        pass

    def result(self) -> dict:
        n = len(self.times) - 1
        decode = self.times[-1] - self.times[0] if n > 0 else 0.0
        return {"prefill_s": self.times[0] - self.start, "decode_tokens": n, "decode_s": decode,
                "decode_tokens_per_s": n / decode if decode else 0.0}


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class BusyMeter:
    """How much of the machine was busy while timing, and how much of that was this process."""

    def __enter__(self) -> BusyMeter:  # noqa: PYI034
        self.t0, self.ticks0, self.self0 = time.perf_counter(), cpu_ticks(), os.times()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        busy1, total1 = cpu_ticks()
        me = os.times()
        busy, total = busy1 - self.ticks0[0], total1 - self.ticks0[1]
        ncpu = os.cpu_count() or 1
        machine_cores = ncpu * busy / total if total else 0.0
        mine = (me.user - self.self0.user) + (me.system - self.self0.system)
        self.result = {"wall_s": round(wall, 3), "machine_busy_cores": round(machine_cores, 2),
                       "this_process_cores": round(mine / wall, 2) if wall else 0.0,
                       "other_processes_cores": round(max(machine_cores - mine / wall, 0.0), 2) if wall else 0.0}


def parse_proc_io(text: str) -> dict[str, int]:
    """/proc/PID/io -> {"rchar": ..., "read_bytes": ..., ...}.

    ``read_bytes`` counts what the process caused to be fetched from the block layer (buffered readahead its
    page faults trigger and O_DIRECT reads alike, all its threads); page-cache hits are not in it, nor reads of
    tmpfs or network filesystems. ``rchar`` counts every byte read(2) returned, cached or not.
    """
    return {k.strip(): int(v) for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def counters() -> dict[str, int]:
    """This process's storage reads and page faults so far (all threads)."""
    io = parse_proc_io(Path("/proc/self/io").read_text())
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"read_bytes": io["read_bytes"], "rchar": io["rchar"], "major_faults": ru.ru_majflt,
            "minor_faults": ru.ru_minflt}


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status in bytes; None without procfs or the field."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's resident set now (VmRSS; file-backed mapped pages included)."""
    return _status_bytes("VmRSS") or 0


def max_rss_bytes() -> int:
    """This process's peak resident set since it started (VmHWM). Not ru_maxrss: Linux carries it over fork and
    exec, so a worker started by a parent that once held 2.4 GB reports >= 2.4 GB. ru_maxrss only without procfs."""
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(generate: Callable[[TokenClock], list[int]], prompt_len: int) -> dict:
    """Time ``generate(clock)`` (it streams the prompt and then each new token to ``clock`` and returns the new
    ids), with storage reads and page faults split into prefill (to the first new token) and decode (the rest)."""
    snaps = {"start": counters()}
    clock = TokenClock(on_first=lambda: snaps.update(first=counters()))
    with BusyMeter() as busy:
        tokens = generate(clock)
    snaps["end"] = counters()
    result = clock.result()
    n = result["decode_tokens"]
    decode = {k: snaps["end"][k] - snaps["first"][k] for k in snaps["end"]}
    return {**result, "prompt_tokens": prompt_len, "prefill_tokens_per_s": prompt_len / result["prefill_s"],
            "prefill_counters": {k: snaps["first"][k] - snaps["start"][k] for k in snaps["end"]},
            "decode_counters": decode, "decode_read_bytes_per_token": decode["read_bytes"] / n if n else None,
            "decode_major_faults_per_token": decode["major_faults"] / n if n else None,
            "busy": busy.result, "new_token_ids": tokens}
