"""docs/errors-and-limits.md: every block on the page runs as written (commands through the CLI's own app, piped input
as its stdin), and the error line it shows is the one the CLI prints."""

from __future__ import annotations

import contextlib
import io
import re
import shlex

from typer.testing import CliRunner, Result

from cli.main import app
from tests.paths import ROOT

PAGE = ROOT / "docs" / "errors-and-limits.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), flags=re.S)


def shell(line: str) -> Result:
    """A documented command line, `echo TEXT | offload ARGS` or `offload ARGS`, run in this process."""
    piped, _, command = line.rpartition("|")
    stdin = shlex.split(piped)[1] + "\n" if piped else None
    args = shlex.split(command)
    assert args[0] == "offload", line
    return CliRunner().invoke(app, args[1:], input=stdin)


def test_the_pages_commands_run():
    commands = [line for block in blocks("bash") for line in block.splitlines() if line.strip()]
    results = [shell(command) for command in commands]
    assert len(commands) == 2 and all(r.exit_code == 0 for r in results), [r.output for r in results]
    assert results[1].stdout.startswith("def fibonacci(n):")


def test_the_error_line_shown_is_the_one_printed():
    (block,) = blocks("text")
    command, shown = block.splitlines()
    result = shell(command.removeprefix("$ "))
    assert result.exit_code == 1 and result.stderr.splitlines()[-1] == shown


def test_the_python_example_runs_and_prints_what_it_says():
    (code,) = blocks("python")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(PAGE), "exec"), {})
    said = re.search(r"print\(e\)  # (.*?) \.\.\.\)", code).group(1)
    assert out.getvalue().startswith(said)
