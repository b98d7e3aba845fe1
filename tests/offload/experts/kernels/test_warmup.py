"""kernels/warmup.py: loading a model on the CPU loads (or compiles) every kernel entry point, so the first token
never does. Checked in a fresh process, where nothing else has called a kernel yet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECK = """
import offload
from offload.experts.kernels import dense, jobs, pool, rows
entry = {"jobs.run": jobs.run, "pool._lead": pool._lead, "pool._serve": pool._serve,
         "rms_rows": dense._rms_rows, "rope_rows": dense._rope_rows, "dequantize_blocks": rows.dequantize_blocks}
assert not any(f.signatures for f in entry.values())
offload.from_pretrained("tiny-moe", device="cpu", threads=2)
missing = [name for name, f in entry.items() if not f.signatures]
assert not missing, missing
"""


def test_loading_a_model_loads_every_kernel_entry_point():
    subprocess.run([sys.executable, "-c", CHECK], check=True, timeout=600, cwd=Path(__file__).parents[4])
