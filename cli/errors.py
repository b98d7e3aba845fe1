"""One line on stderr for every failure a user can fix: the CLI's and the scripts' shared exit path."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from typer.core import TyperGroup

from offload.errors import OffloadError


def fail(message: str, hint: str = "", code: int = 1) -> NoReturn:
    line = f"Error: {message}" + (f" (hint: {hint})" if hint else "")
    print(line.replace("\n", " "), file=sys.stderr)
    sys.exit(code)


def _os_error(e: OSError) -> str:
    return f"{e.strerror or e} ({e.filename})" if e.filename else str(e)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Inside: an OffloadError or OSError ends the program with one ``Error: ...`` line and exit code 1."""
    try:
        yield
    except OffloadError as e:
        fail(e.message, e.hint)
    except OSError as e:
        fail(_os_error(e))


INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program Ctrl-C stopped


class OneLineErrors(TyperGroup):
    """Every known failure ends as one line on stderr and a non-zero exit, never a traceback or a panel."""

    def invoke(self, ctx):
        """A command's run; Ctrl-C ends it with exit code 130 and a line saying so (typer would turn it into an
        Exit(130) that, outside standalone mode, comes back as a plain return value and the exit code 0)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            fail("interrupted", code=INTERRUPTED)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            with one_line_errors():
                code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Exit as e:
            sys.exit(e.exit_code)
        except typer.Abort:
            fail("aborted")
        except typer.TyperException as e:  # typer's (vendored click) usage errors: bad or missing options
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            if not message:  # bare `offload`: help was printed already
                sys.exit(getattr(e, "exit_code", 2))
            fail(message, "see `offload COMMAND --help`", code=getattr(e, "exit_code", 2))
        if isinstance(code, int) and code:  # outside standalone mode typer returns an Exit's code: pass it on
            sys.exit(code)
        return code
