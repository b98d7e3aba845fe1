"""scripts/timing.py: the peak-RSS reading of a benchmark worker (the rest is tested with bench_vs_llamacpp)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import load_script

timing = load_script("timing")

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
_PARENT = """
import subprocess, sys
held = bytearray(400 * 2**20)
for i in range(0, len(held), 4096):
    held[i] = 1  # touch every page: 400 MiB resident in the parent
child = "import sys; sys.path.insert(0, sys.argv[1]); import timing; print(timing.max_rss_bytes())"
print(subprocess.run([sys.executable, "-c", child, sys.argv[1]], capture_output=True, text=True, check=True).stdout)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs procfs")
def test_a_workers_peak_rss_is_its_own_not_its_parents():
    # Linux carries ru_maxrss over fork and exec: a worker of a parent that held 400 MiB would report >= 400 MiB
    out = subprocess.run([sys.executable, "-c", _PARENT, str(SCRIPTS)], capture_output=True, text=True, check=True)
    assert 0 < int(out.stdout.strip()) < 200 * 2**20


def test_peak_rss_covers_what_this_process_holds():
    held = bytearray(64 * 2**20)
    for i in range(0, len(held), 4096):
        held[i] = 1
    assert timing.max_rss_bytes() >= 64 * 2**20
