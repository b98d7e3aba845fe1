"""The house rules a newcomer relies on: data flows one way (no import cycle, each layer imports only the layers
below it), functions fit on a screen, the cache moves no bytes itself, and analysis code stays out of the runtime's
import graph."""

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


# -- the import graph: every import counts, at the top of a module, inside a function or under TYPE_CHECKING ----------

# The floors of the house, lowest first: a module may import its own layer's modules and any lower floor's, never a
# floor above or a sibling layer on its own floor. The most specific prefix names a module's layer.
FLOORS: dict[str, int] = {
    "offload.errors": 0, "offload.version": 0,
    "offload.registry": 1, "offload.stats": 1, "offload.files": 1, "offload.spec": 1, "offload.amounts": 1,
    "offload.experts": 2, "offload.traces": 2,
    "offload.model": 3, "offload.hw": 3,
    "offload.checkpoint": 4,
    "predictors": 5,
    "offload.memory": 6,
    "offload.runtime": 7,
    "offload.serve": 8, "offload.sim": 8,
    "offload.tools": 9, "predictors.evaluate": 9,
    "offload": 11,  # the package's face (offload/__init__.py): from_pretrained, RuntimeConfig, SamplingConfig, errors
    "cli": 12,
}


def _module_names() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (resolved to the longest existing module name)."""
    mods = _module_names()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        package = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [module, *(f"{module}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != m:
                    edges[m].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> str:
    """The most specific FLOORS prefix naming ``module``."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} is on no floor: add its package to FLOORS")


def test_there_is_no_import_cycle():
    assert _cycles(import_graph()) == []


def test_each_layer_imports_only_the_floors_below_it():
    wrong = []
    for module, targets in import_graph().items():
        layer = layer_of(module)
        for target in targets:
            other = layer_of(target)
            if other != layer and FLOORS[other] >= FLOORS[layer]:
                wrong.append(f"{module} ({layer}, floor {FLOORS[layer]}) imports {target} ({other}, floor "
                             f"{FLOORS[other]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_subpackages_are_empty_and_nothing_in_offload_imports_its_face():
    for init in (ROOT / "offload").rglob("__init__.py"):
        if init.parent != ROOT / "offload":
            body = [n for n in ast.parse(init.read_text()).body if not isinstance(n, ast.Expr)]  # a docstring only
            assert not body, f"{init.relative_to(ROOT)} re-exports: keep subpackage __init__ files empty"
    faces = [m for m, targets in import_graph().items() if m.startswith("offload.") and "offload" in targets]
    assert not faces, f"these import the offload package's face (offload/__init__.py): {faces}"
