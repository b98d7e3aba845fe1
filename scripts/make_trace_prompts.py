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

import argparse
import json
import re
import sysconfig
from pathlib import Path

from train_tiny_moe import collect_sources, is_held_out  # scripts/ is on sys.path when run as a script

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the two .prompts.jsonl files")
    p.add_argument("--prompts", type=int, default=40, help="prompts per set")
    p.add_argument("--chars", type=int, default=200, help="characters per prompt (at most)")
    args = p.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    args.out.mkdir(parents=True, exist_ok=True)
    for name, prompts in (("stdlib-heldout", code_snippets(stdlib, args.prompts, args.chars)),
                          ("stdlib-prose", prose_snippets(stdlib, args.prompts, args.chars))):
        path = args.out / f"{name}.prompts.jsonl"
        path.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in prompts))
        print(f"wrote {path}: {len(prompts)} prompts")


if __name__ == "__main__":
    main()
