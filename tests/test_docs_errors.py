"""docs/errors-and-limits.md's error example: the ```text block shows a command that fails (tests/test_docs.py runs
only commands that succeed) and the line it prints; this runs the command and compares."""

from __future__ import annotations

import shlex

from typer.testing import CliRunner

from cli.main import app
from tests.paths import ROOT
from tests.test_docs import blocks


def test_the_error_line_shown_is_the_one_printed():
    (block,) = [b for b in blocks(ROOT / "docs" / "errors-and-limits.md") if b.lang == "text"]
    command, shown = block.text.splitlines()
    args = shlex.split(command.removeprefix("$ "))
    result = CliRunner().invoke(app, args[1:])
    assert args[0] == "offload" and result.exit_code == 1
    assert result.stderr.splitlines()[-1] == shown
