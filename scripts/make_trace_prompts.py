"""Write the two prompt sets whose tiny-moe routing traces the predictor evaluation uses.

    python scripts/make_trace_prompts.py --out scripts/results/traces

* ``stdlib-heldout.prompts.jsonl``: code the model never trained on: ~200-character snippets starting
  at a ``def``/``class`` line of the standard-library modules that scripts/train_tiny_moe.py held out
  (md5('0:' + module) % 100 < 5), spread evenly over all such lines.
* ``stdlib-prose.prompts.jsonl``: English prose the model never saw (it trained on .py files only):
  paragraphs of the stdlib's .txt/.rst documents (IDLE's NEWS, HISTORY, README, ..., email's
  architecture notes, the licence), ~200 characters cut at a word boundary.

Both are deterministic for a given Python version (they read this interpreter's stdlib).
"""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path
from typing import Annotated

import typer
from common import main, make_app, write_text
from train_tiny_moe import collect_sources, is_held_out  # a sibling script: scripts/ is on sys.path, as common is

app = make_app(__doc__.split("\n\n")[0])
PROSE_FILES = ("idlelib/NEWS.txt", "idlelib/NEWS2x.txt", "idlelib/HISTORY.txt", "idlelib/README.txt",
               "idlelib/extend.txt", "idlelib/CREDITS.txt", "idlelib/TODO.txt", "email/architecture.rst",
               "LICENSE.txt")


def spread(items: list, n: int) -> list:
    """``n`` items evenly spaced over ``items`` (all of them if there are fewer)."""
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


def code_snippets(stdlib: Path, n: int, chars: int) -> list[str]:
    sources, _ = collect_sources(stdlib, 300_000)
    starts = []
    for src in sources:
        if not is_held_out(src.module, 5, 0):
            continue
        lines = src.text.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if re.match(r"\s*(def|class) ", line):
                starts.append((src.module, lines, i))
    out = []
    for _, lines, i in spread(starts, n):
        text = ""
        for line in lines[i:]:
            if len(text) + len(line) > chars and text:
                break
            text += line
        out.append(text[:chars])
    return out


def prose_snippets(stdlib: Path, n: int, chars: int) -> list[str]:
    paragraphs = []
    for name in PROSE_FILES:
        path = stdlib / name
        if not path.is_file():
            continue
        for para in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            words = " ".join(para.split())
            if len(words) >= 150 and sum(c.isalpha() for c in words) > 0.7 * len(words):  # prose, not tables
                paragraphs.append(words)
    return [p[:chars].rsplit(" ", 1)[0] if len(p) > chars else p for p in spread(paragraphs, n)]


@app.command()
def write_prompts(
    out: Annotated[Path, typer.Option(help="Folder for the two .prompts.jsonl files.")],
    prompts: Annotated[int, typer.Option(help="Prompts per set.")] = 40,
    chars: Annotated[int, typer.Option(help="Characters per prompt (at most).")] = 200,
) -> None:
    """Write stdlib-heldout.prompts.jsonl (held-out stdlib code) and stdlib-prose.prompts.jsonl (stdlib prose)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name, texts in (("stdlib-heldout", code_snippets(stdlib, prompts, chars)),
                        ("stdlib-prose", prose_snippets(stdlib, prompts, chars))):
        path = out / f"{name}.prompts.jsonl"
        write_text(path, "".join(json.dumps({"prompt": text}) + "\n" for text in texts))
        print(f"wrote {path}: {len(texts)} prompts")


if __name__ == "__main__":
    main(app)
