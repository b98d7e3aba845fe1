"""Files the product reads and writes for users: prompts files in, atomic outputs out.

Every output goes to a temporary name beside its target and is renamed over it only when complete,
so an interrupted or failed command never leaves a truncated file under the user's name and never
destroys an existing file before its replacement is whole (rename is atomic within a directory). The
temporary's name is unique and created exclusively, so the only thing ever removed is what was created here.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from offload.errors import ConfigError, OutputError

PARTIAL = ".partial"


def _new_partial(path: Path, directory: bool) -> Path:
    """Create an empty temporary beside ``path`` under a name no one else holds, ``NAME.partial-<pid>-<random>``,
    with mkdir / O_EXCL: it is this call's own, so removing it can never remove a user's file or folder (an
    existing ``NAME.partial``, even the source of the very command, is never touched)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(16):
        tmp = path.with_name(f"{path.name}{PARTIAL}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            if directory:
                tmp.mkdir()
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise OutputError(f"cannot create a temporary beside {path}", "check the folder's permissions")


@contextmanager
def atomic_output(path: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success rename it over ``path``.

    On an exception (KeyboardInterrupt included) the temporary is removed and ``path`` is left as it
    was. ``directory=True`` makes the temporary a fresh directory (a checkpoint); the target must
    then not exist or be an empty directory, since a rename cannot replace a non-empty one.
    """
    path = Path(path)
    if directory and (path.is_symlink() or path.exists() and (not path.is_dir() or any(path.iterdir()))):
        raise ConfigError(f"{path} exists and is not an empty directory", "give a new output directory")
    tmp = _new_partial(path, directory)
    try:
        yield tmp
        if directory and path.is_dir():
            path.rmdir()  # empty (checked above): os.replace cannot replace a directory
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    """Remove a temporary this module created (never called on any other path)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: object, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (one trailing newline) through a temporary file."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .jsonl file (strings or objects with "prompt"/"text") or a text file, one per line."""
    if not path.is_file():
        raise ConfigError(f"prompts file {path} does not exist", "give a .txt (one prompt per line) or .jsonl file")
    prompts = []
    for n, line in enumerate(read_text(path, "prompts file").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            line = _jsonl_prompt(line, f"{path}:{n}")
        prompts.append(line)
    if not prompts:
        raise ConfigError(f"prompts file {path} holds no prompts")
    return prompts


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file's content, or a ConfigError naming it and where it stops being text (a binary file)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.start})", "give a UTF-8 text file") from None
    if "\x00" in text:
        raise ConfigError(f"{what} {path} is not text (it holds NUL bytes)", "give a UTF-8 text file")
    return text


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise ConfigError(f"{where} is not valid JSON", "one JSON string or object per line") from None
    obj = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else obj
    if not isinstance(obj, str):
        raise ConfigError(f"{where} has no prompt string", 'write {"prompt": "..."} or a JSON string')
    return obj
