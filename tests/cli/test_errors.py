"""cli/errors.py: known failures end as exactly one stderr line and a non-zero exit code."""

from __future__ import annotations

import pytest

from cli.errors import fail, one_line_errors
from offload.errors import ConfigError


def test_offload_errors_become_one_line(capsys):
    with pytest.raises(SystemExit) as info, one_line_errors():
        raise ConfigError("bad value\nsecond line", "fix it")
    assert info.value.code == 1
    assert capsys.readouterr().err == "Error: bad value second line (hint: fix it)\n"


def test_os_errors_name_the_file(capsys, tmp_path):
    with pytest.raises(SystemExit), one_line_errors():
        open(tmp_path / "nope.txt")
    err = capsys.readouterr().err
    assert err.startswith("Error: No such file or directory") and "nope.txt" in err and err.count("\n") == 1


def test_fail_exit_code(capsys):
    with pytest.raises(SystemExit) as info:
        fail("usage", code=2)
    assert info.value.code == 2 and capsys.readouterr().err == "Error: usage\n"
