"""docs/families.md: every Python block runs from the repository root and prints what its comment says."""

from __future__ import annotations

import contextlib
import io
import os
import re

from tests.paths import ROOT

DOC = ROOT / "docs" / "families.md"


def test_every_python_block_runs_and_prints_what_it_says() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        expected = [m.split("#")[1].split(":")[0].strip() for m in block.splitlines() if m.startswith("print(")]
        out, cwd = io.StringIO(), os.getcwd()
        try:
            os.chdir(ROOT)
            with contextlib.redirect_stdout(out):
                exec(compile(block, str(DOC), "exec"), {})
        finally:
            os.chdir(cwd)
        assert out.getvalue().split("\n")[: len(expected)] == expected
