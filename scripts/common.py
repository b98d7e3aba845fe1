"""What every script in scripts/ shares: the Typer app and its exit path, progress bars, atomic outputs, the machine.

scripts/ is not a package: a script imports this module by name (``from common import ...``), which works
because Python puts a script's own folder first on sys.path; tests put scripts/ there themselves. Importing
it also puts this checkout's root first on sys.path, so a script always runs the offload, predictors and cli
packages beside it (not another checkout's editable install) and can import tests/reference.py.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from typer.core import TyperCommand

ROOT = Path(__file__).resolve().parents[1]
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))

# After the path: these must come from this checkout.
from cli.errors import one_line_errors  # noqa: E402
from offload.files import atomic_output, write_text_atomic  # noqa: E402
from offload.hw import machine as hardware  # noqa: E402

err = Console(stderr=True)  # progress, hints and errors; results go to stdout


# -------------------------------------------------------------------------------------- the app


class OneLineCommand(TyperCommand):
    """A script's command: an OffloadError or OSError raised by its body ends as one ``Error: ...`` line
    and exit code 1, under typer.testing.CliRunner as in a real run."""

    def invoke(self, ctx):
        with one_line_errors():
            return super().invoke(ctx)


class ScriptApp(typer.Typer):
    """A Typer app whose commands are OneLineCommands, shown with the app's help when they have no docstring
    (a one-command app prints its command's help, not the app's) and help when run bare as the app says."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable], Callable]:
        kwargs.setdefault("cls", OneLineCommand)
        kwargs.setdefault("no_args_is_help", self.info.no_args_is_help)

        def register(function: Callable) -> Callable:
            if function.__doc__ is None:
                kwargs.setdefault("help", self.info.help)
            return super(ScriptApp, self).command(*args, **kwargs)(function)

        return register


def make_app(help: str, no_args_is_help: bool = True) -> ScriptApp:
    """The Typer app of one script: no shell completion, no pretty tracebacks, help when run bare.

    A script whose every option has a default (a benchmark run at its default scale) passes
    ``no_args_is_help=False`` so that running it bare runs it.
    """
    return ScriptApp(help=help, add_completion=False, pretty_exceptions_enable=False,
                     no_args_is_help=no_args_is_help)


def main(app: typer.Typer) -> None:
    """Run ``app`` on sys.argv; an OffloadError or OSError anywhere ends as one line on stderr, exit code 1."""
    with one_line_errors():
        app()


def progress_bar(*extra: ProgressColumn | str) -> Progress:
    """A transient rich progress bar on stderr (description, bar, done/total, elapsed, then ``extra``),
    silent when stderr is not a terminal (a log file or a pipe gets no control codes)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), *extra)
    return Progress(*columns, console=err, transient=True, disable=not err.is_terminal)


# ---------------------------------------------------------------------------------- the machine


def machine_info(*extra_packages: str) -> dict[str, Any]:
    """offload.hw.machine.machine_info() (CPU, cores, RAM, GPUs, versions, plus ``extra_packages``'
    versions) and how busy the machine is now: the load average and torch's thread count."""
    import torch  # here, not at the top: the trace-only scripts never need torch otherwise

    info = hardware.machine_info()
    if extra_packages:
        info["versions"] |= hardware.machine_info(extra_packages)["versions"]
    return {**info, "loadavg": list(os.getloadavg()), "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------ atomic outputs


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (a Markdown table, a prompts file) to ``path`` atomically, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def write_json(path: str | os.PathLike, obj: object, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (non-ASCII kept as is), creating its folder."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_results(out: str | os.PathLike, record: dict, table: str) -> None:
    """A benchmark's record as JSON at ``out`` and its table beside it (``.md``); the table to stdout, the path to
    stderr."""
    out = Path(out)
    write_json(out, record)
    write_text(out.with_suffix(".md"), table)
    print(table)
    print(f"wrote {out}", file=sys.stderr)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to give a writer that takes a file name (csv, matplotlib's savefig); when the
    block ends without an exception it is renamed over ``path``, otherwise removed, ``path`` left as it was.

    The temporary ends in ``path``'s own suffix (``sweep.png.partial-<pid>-<random>.png``), since matplotlib picks the
    image format from the file name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        named = tmp.with_name(tmp.name + path.suffix)  # beside atomic_output's own unique temporary
        try:
            yield named
            named.replace(tmp)  # atomic_output renames tmp over path once this block is left
        finally:
            named.unlink(missing_ok=True)
