"""Files the product reads and writes for users: prompts files in, atomic outputs out.

Every output goes to a temporary name beside its target and is renamed over it only when complete,
so an interrupted or failed command never leaves a truncated file under the user's name and never
destroys an existing file before its replacement is whole (rename is atomic within a directory).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from offload.errors import ConfigError

PARTIAL = ".partial"


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is complete: beside it, so the final rename stays on one file system."""
    return path.with_name(path.name + PARTIAL)


@contextmanager
def atomic_output(path: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success rename it over ``path``.

    On an exception (KeyboardInterrupt included) the temporary is removed and ``path`` is left as it
    was. ``directory=True`` makes the temporary a fresh directory (a checkpoint); the target must
    then not exist or be an empty directory, since a rename cannot replace a non-empty one.
    """
    path = Path(path)
    tmp = partial_path(path)
    _remove(tmp)  # a stale temporary from an earlier interrupted run
    if directory:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConfigError(f"{path} exists and is not an empty directory", "give a new output directory")
        tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if directory and path.is_dir():
        path.rmdir()  # empty (checked above): os.replace cannot replace a directory
    os.replace(tmp, path)


def _remove(path: Path) -> None:
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
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            line = _jsonl_prompt(line, f"{path}:{n}")
        prompts.append(line)
    if not prompts:
        raise ConfigError(f"prompts file {path} holds no prompts")
    return prompts


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise ConfigError(f"{where} is not valid JSON", "one JSON string or object per line") from None
    obj = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else obj
    if not isinstance(obj, str):
        raise ConfigError(f"{where} has no prompt string", 'write {"prompt": "..."} or a JSON string')
    return obj
