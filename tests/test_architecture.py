"""The house rules a newcomer relies on: data flows one way, functions fit on a screen, the cache
moves no bytes itself, and analysis code stays out of the runtime's import graph."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("offload", "predictors", "cli")


def _functions():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield path.relative_to(ROOT), node


def test_no_function_is_longer_than_sixty_lines():
    def is_kernel(node) -> bool:  # numba kernels keep their loop in one piece, as the hot path needs
        return any("njit" in ast.unparse(d) for d in node.decorator_list)

    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, node in _functions() if node.end_lineno - node.lineno + 1 > 60 and not is_kernel(node)]
    assert not long, long


def test_the_cache_has_no_device_code():
    text = (ROOT / "offload" / "memory" / "cache.py").read_text()
    assert "cuda" not in text and "device.type" not in text


def test_analysis_modules_are_not_flat_in_the_runtime():
    flat = {p.name for p in (ROOT / "offload").glob("*.py")}
    assert not flat & {"trace.py", "tracing.py", "simulate.py", "sweep.py", "batchsim.py"}


RUNTIME_MODULES = ("offload", "offload.runtime.load", "offload.runtime.batch", "offload.serve.chat", "predictors",
                   "cli.main")


def test_the_runtime_never_imports_analysis_code():
    # One fresh interpreter (torch's import is the slow part): the analysis packages must not be among the
    # modules the runtime and the CLI pull in.
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {RUNTIME_MODULES!r}]; "
            "bad = sorted(m for m in sys.modules if m.startswith(('offload.traces', 'offload.sim'))); "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"the runtime pulls in {out.stdout.strip()}"


def test_predictors_and_policies_never_import_the_model():
    for path in [*(ROOT / "predictors").glob("*.py"), ROOT / "offload" / "memory" / "policies.py"]:
        nodes = ast.walk(ast.parse(path.read_text()))
        imported = {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"offload.model.forward", "offload.runtime.load", "offload.memory.cache"}, path
