"""offload/files.py: prompts files, and outputs that are complete or absent, never truncated."""

from __future__ import annotations

import pytest

from offload.errors import ConfigError
from offload.files import read_prompts


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("def f(x):\n\nimport os\n")
    assert read_prompts(tmp_path / "p.txt") == ["def f(x):", "import os"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a\\nb"}\n"c"\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a\nb", "c"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": 1}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1 has no prompt"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        read_prompts(tmp_path / "none.txt")
