"""Every command in docs/gguf.md runs, on a tiny GGUF file written the way llama.cpp writes one."""

from __future__ import annotations

import re
import shlex

from typer.testing import CliRunner

from cli.main import app
from tests.offload.runtime.test_gguf_runtime import gguf_file  # noqa: F401 - the fixture
from tests.paths import ROOT


def test_every_command_in_the_gguf_doc_runs(gguf_file):  # noqa: F811
    text = (ROOT / "docs" / "gguf.md").read_text()
    commands = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    assert len(commands) >= 3
    for line in commands:
        args = shlex.split(line.replace("model.gguf", str(gguf_file)))
        assert args[0] == "offload"
        result = CliRunner().invoke(app, [*args[1:], *(["--device", "cpu"] if args[1] != "info" else [])])
        assert result.exit_code == 0, (line, result.output)
