"""docs/errors-and-limits.md: every block on the page runs as written (commands through `python -m cli.main`), and
the error line it shows is the one the CLI prints."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys

from tests.paths import ROOT

PAGE = ROOT / "docs" / "errors-and-limits.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), flags=re.S)


def shell(command: str) -> subprocess.CompletedProcess:
    """A documented command line, with `offload` run from this checkout."""
    command = re.sub(r"(^|\| )offload ", rf"\1{sys.executable} -m cli.main ", command)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_pages_commands_run():
    commands = [line for block in blocks("bash") for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    results = [shell(command) for command in commands]
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert results[1].stdout.startswith("def fibonacci(n):")


def test_the_error_line_shown_is_the_one_printed():
    (block,) = blocks("text")
    command, shown = block.splitlines()
    result = shell(command.removeprefix("$ "))
    assert result.returncode == 1 and result.stderr.splitlines()[-1] == shown


def test_the_python_example_runs_and_prints_what_it_says():
    (code,) = blocks("python")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(PAGE), "exec"), {})
    said = re.search(r"print\(e\)  # (.*?) \.\.\.\)", code).group(1)
    assert out.getvalue().startswith(said)
