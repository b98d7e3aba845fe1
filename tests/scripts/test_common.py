"""scripts/common.py: the machine description, atomic outputs that never leave a truncated file, one-line errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from offload.errors import ConfigError
from tests.scripts import load_script

common = load_script("common")


def test_machine_info_describes_the_machine_and_how_busy_it_is() -> None:
    info = common.machine_info()
    assert {"cpu_model", "cores", "ram_bytes", "gpus", "platform", "python", "versions"} <= set(info)
    assert info["cores"] >= 1 and info["ram_bytes"] > 0 and isinstance(info["gpus"], list)
    assert info["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert len(info["loadavg"]) == 3 and all(x >= 0 for x in info["loadavg"])
    assert info["torch_threads"] == torch.get_num_threads()
    json.dumps(info)  # it goes into every result file


def test_machine_info_adds_versions_of_extra_packages() -> None:
    versions = common.machine_info("pytest", "no-such-package-here")["versions"]
    assert versions["pytest"] == pytest.__version__ and versions["no-such-package-here"] is None
    assert "torch" in versions  # the defaults stay


def _fail_midway(monkeypatch: pytest.MonkeyPatch) -> None:
    """Path.write_text writes half of its text, then the disk "fills up"."""
    def write_half(self: Path, text: str, *args, **kwargs) -> int:
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", write_half)


def test_write_json_and_text_leave_the_old_file_whole_when_writing_fails(tmp_path, monkeypatch) -> None:
    target, table = tmp_path / "result.json", tmp_path / "table.md"
    common.write_json(target, {"old": [1, 2, 3]})
    common.write_text(table, "| old |\n")
    _fail_midway(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        common.write_json(target, {"new": list(range(1000))})
    with pytest.raises(OSError, match="No space left"):
        common.write_text(table, "| new |\n" * 100)
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": [1, 2, 3]} and table.read_text() == "| old |\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json", "table.md"]  # no temporaries left


def test_write_json_creates_folders_and_keeps_text_readable(tmp_path) -> None:
    target = tmp_path / "a" / "b" / "r.json"
    common.write_json(target, {"split": "a → b"})
    assert target.read_text() == '{\n "split": "a → b"\n}\n'


def test_atomic_path_renames_on_success_and_keeps_the_suffix(tmp_path) -> None:
    target = tmp_path / "out" / "plot.png"
    with common.atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == target.parent and tmp != target  # savefig reads the suffix
        tmp.write_bytes(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["plot.png"]


def test_atomic_path_leaves_the_old_file_when_the_writer_raises(tmp_path) -> None:
    target = tmp_path / "sweep.csv"
    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt), common.atomic_path(target) as tmp:
        tmp.write_text("half a ro")
        raise KeyboardInterrupt  # an interrupted run
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["sweep.csv"]


def _toy_app(error: Exception):
    app = common.make_app("A toy script.")

    @app.command()
    def toy(fail: bool = False) -> None:
        if fail:
            raise error
        print("ran")

    return app


@pytest.mark.parametrize("error, line", [
    (ConfigError("bad --x 3", "give 1 or 2"), "Error: bad --x 3 (hint: give 1 or 2)\n"),
    (FileNotFoundError(2, "No such file or directory", "/no/trace"), "Error: No such file or directory (/no/trace)\n"),
])
def test_main_ends_errors_as_one_line_and_exit_code_1(error, line, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["toy.py", "--fail"])
    with pytest.raises(SystemExit) as exit_:
        common.main(_toy_app(error))
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert captured.err == line and captured.out == ""
    result = CliRunner().invoke(_toy_app(error), ["--fail"])  # the same line under the test runner
    assert result.exit_code == 1 and result.stderr == line and result.stdout == ""


def test_main_runs_the_command_and_a_bare_call_prints_help(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["toy.py", "--no-fail"])
    with pytest.raises(SystemExit) as exit_:
        common.main(_toy_app(ValueError()))
    assert exit_.value.code == 0 and capsys.readouterr().out == "ran\n"
    result = CliRunner().invoke(_toy_app(ValueError()), [])
    assert "Usage" in result.output and "A toy script." in result.output and "ran" not in result.output


def test_progress_bar_is_transient_on_stderr_and_silent_off_a_terminal() -> None:
    progress = common.progress_bar("extra")
    assert progress.live.transient and progress.console.stderr
    assert progress.disable  # pytest's stderr is not a terminal
    assert len(progress.columns) == 5
