"""offload/files.py: prompts files, and outputs that are complete or absent, never truncated."""

from __future__ import annotations

import json

import pytest

from offload.errors import ConfigError
from offload.files import atomic_output, read_prompts, write_json_atomic, write_text_atomic


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


def test_atomic_output_replaces_only_when_complete(tmp_path):
    target = tmp_path / "stats.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and list(tmp_path.iterdir()) == [target]
    write_text_atomic(tmp_path / "new.txt", "x")
    assert (tmp_path / "new.txt").read_text() == "x"


def test_atomic_directory_never_overwrites_a_non_empty_one(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_output(out, directory=True) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not out.exists()
    assert (out / "config.json").is_file()
    with pytest.raises(ConfigError, match="not an empty directory"), atomic_output(out, directory=True):
        pass
    with pytest.raises(ValueError), atomic_output(tmp_path / "other", directory=True) as tmp:
        (tmp / "x").write_text("partial")
        raise ValueError
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.partial").exists()


def test_temporaries_never_collide_with_what_is_there(tmp_path):
    # OUT.partial existing (a file or a folder of the user's) is neither used nor removed, success or failure
    for kind in ("file", "dir"):
        target = tmp_path / kind / "out"
        target.parent.mkdir()
        theirs = target.with_name("out.partial")
        theirs.mkdir() if kind == "dir" else theirs.write_text("mine")
        with pytest.raises(RuntimeError), atomic_output(target, directory=kind == "dir") as tmp:
            assert tmp != theirs and tmp.name.startswith("out.partial-")
            raise RuntimeError
        with atomic_output(target, directory=kind == "dir") as tmp:
            (tmp / "x").write_text("new") if kind == "dir" else tmp.write_text("new")
        assert sorted(p.name for p in target.parent.iterdir()) == ["out", "out.partial"]
        assert theirs.is_dir() if kind == "dir" else theirs.read_text() == "mine"


def test_a_binary_prompts_file_is_one_line(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"ok\n\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match=r"prompts file .*p.txt is not UTF-8 text \(byte 3\)"):
        read_prompts(tmp_path / "p.txt")
    (tmp_path / "n.txt").write_bytes(b"a\x00b\n")
    with pytest.raises(ConfigError, match="holds NUL bytes"):
        read_prompts(tmp_path / "n.txt")
