"""A real `offload serve` process for the tests: started on a free 127.0.0.1 port, waited for (bounded), stopped
with SIGINT. Shared by tests/offload/test_server.py and tests/cli/test_serve.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
START_S = 120      # the server process must answer /health within this (imports torch on a shared machine)
REQUEST_S = 60     # any one request
SERVE_ARGS = ("--device", "cpu", "--expert-budget", "6", "--max-batch", "4", "--context", "128")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`python -m cli.main serve` on a free port; returns once /health says ok (or fails the test)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core per process, as the tests' own torch
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", str(model_dir), "--port", str(port),
                                 *SERVE_ARGS, *extra], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"offload serve exited with {proc.returncode}: {log.read_text()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"offload serve did not become healthy in {START_S}s: {log.read_text()}")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)
        raise
