"""README.md and docs/ as a user reads them: every example a user would paste runs here, so none can rot again.

Each fenced block has a language. ```python blocks are executed, one namespace per document, in order.
```bash blocks run line by line (backslash continuations joined; ``&&`` chains split): an ``offload ...`` line goes
through the CLI in this process (typer's CliRunner; ``printf ... | offload ...`` too, fed what the left side
printed), ``offload serve ... &`` starts a real server in the background
for the rest of its document (on a free port, which replaces 8000 in the lines and blocks that follow), the steps
that build the environment (a venv, pip, the test suite itself) are skipped and listed, and any other line
(curl, a pipe into ``offload chat``, ``python scripts/...``) runs in bash with ``offload`` and ``python`` on PATH.
Each document runs in its own temporary folder that mirrors the clone (links to its top-level entries), so paths
such as ``tests/data/...`` resolve as they do for a user at the repository root, while outputs land in the
temporary folder; the clone's ``git status`` must be the same afterwards. ```text blocks are outputs, synopses or
illustrations and ```json blocks data shapes; neither runs.

Markers are HTML comments on the line above a fence (invisible on GitHub):
``<!-- not run: REASON -->`` for a block that cannot run here (a GPU, the network, hours); every such block is
listed in NOT_RUN below, so none escapes silently. ``<!-- output -->`` above a ```text block: it is what the
last command before it printed (stdout and stderr as a terminal shows them; whitespace and timings, which vary,
are normalised).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.paths import ROOT
from tests.serve_process import START_S, free_port, stop_server

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = {"python", "bash", "text", "json"}
# Blocks that cannot run here, by (document, first line of the block): adding one means adding it here too.
NOT_RUN = {
    ("docs/usage.md", "offload info mistralai/Mixtral-8x7B-Instruct-v0.1             # what fits on this machine"):
        "needs the network",
    ("docs/usage.md", "model = offload.from_pretrained(\"mistralai/Mixtral-8x7B-Instruct-v0.1\", device=\"cuda\", "
                      "dtype=\"bfloat16\","): "needs a GPU and the network",
    ("docs/performance.md", "bash scripts/gpu_check.sh"): "needs a GPU",
    ("docs/quantization.md", "offload bench-hw --path /path/to/checkpoints"): "measures the machine for about 30 s",
    ("docs/models.md", "python scripts/train_tiny_moe.py --out tiny-moe-64 --architecture olmoe --experts 64 "
                       "--top-k 8 --intermediate 32 \\"): "64 minutes of training",
    ("docs/models.md", "python scripts/train_tiny_moe.py --out tiny-moe --steps 1800 --threads 1"):
        "35 minutes of training",
}
# Steps that build the environment a user runs the examples in; this suite runs inside that environment already.
ENVIRONMENT = re.compile(r"(python3? -m venv |\. \.venv/bin/activate|source |pip install |python -m pytest )")
SHELL = re.compile(r"[|<>;`$]")  # a line with any of these is shell, not a plain `offload` command
MARKER = re.compile(r"<!--\s*(.*?)\s*-->")
PORT = "8000"  # the port the docs' server examples use, replaced by a free one when run


@dataclass(frozen=True)
class Block:
    doc: str      # path relative to the repository root
    line: int     # of the opening fence, 1-based
    lang: str
    text: str
    marker: str   # the HTML comment right above the fence, or ""

    @property
    def first_line(self) -> str:
        return self.text.splitlines()[0] if self.text.strip() else ""

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    """The fenced blocks of a markdown file, with the marker comment (if any) on the last line above each."""
    out, lines, i = [], doc.read_text().splitlines(), 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("```"):
            i += 1
            continue
        start, lang = i, lines[i].strip()[3:].strip()
        above = next((s.strip() for s in reversed(lines[:start]) if s.strip()), "")
        marker = MARKER.fullmatch(above)
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        out.append(Block(str(doc.relative_to(ROOT)), start + 1, lang, "\n".join(lines[start + 1:i]),
                         marker.group(1) if marker else ""))
        i += 1
    return out


ALL_BLOCKS = [b for doc in DOCS for b in blocks(doc)]


def shell_lines(text: str) -> list[str]:
    """A bash block's commands: continuations joined, blank and comment lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def normalised(text: str) -> str:
    """Whitespace collapsed and timings masked: what a terminal shows, minus what varies from run to run."""
    text = re.sub(r"\d+\.\d+(?=s\b| tokens/s)", "<t>", text)
    return " ".join(text.split())


@dataclass
class Session:
    """One document's run: its working folder, the Python namespace its blocks share, its server."""

    workdir: Path
    bin: Path
    namespace: dict = field(default_factory=lambda: {"__name__": "__docs__"})
    server: subprocess.Popen | None = None
    port: str = PORT
    last_output: str = ""
    skipped: list[str] = field(default_factory=list)

    def text(self, text: str) -> str:
        """``text`` with the docs' server port replaced by this session's."""
        return text.replace(f"127.0.0.1:{PORT}", f"127.0.0.1:{self.port}").replace(f"localhost:{PORT}",
                                                                                 f"localhost:{self.port}")

    def env(self) -> dict[str, str]:
        path = os.pathsep.join([str(self.bin), os.environ.get("PATH", "")])
        python_path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        return {**os.environ, "PATH": path, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}

    def close(self) -> None:
        if self.server is not None:
            stop_server(self.server)
            self.server = None


def _session(tmp_path: Path) -> Session:
    """A working folder that mirrors the clone's top level (links), and ``offload`` / ``python`` shims for bash."""
    workdir, shims = tmp_path / "work", tmp_path / "bin"
    workdir.mkdir()
    shims.mkdir()
    for entry in ROOT.iterdir():
        if not entry.name.startswith("."):
            (workdir / entry.name).symlink_to(entry)
    for name, command in (("offload", f'"{sys.executable}" -m cli.main'), ("python", f'"{sys.executable}"')):
        shim = shims / name
        shim.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        shim.chmod(0o755)
    return Session(workdir, shims)


def run_cli(session: Session, block: Block, args: list[str], stdin: str | None = None) -> None:
    result = CliRunner().invoke(app, args, input=stdin)
    session.last_output = result.output
    assert result.exit_code == 0, f"{block.where}: offload {shlex.join(args)} exited {result.exit_code}:\n" \
                                  f"{result.output}{result.exception!r}"


def run_bash(session: Session, block: Block, line: str) -> str:
    """``line`` in bash in the document's folder; returns its stdout."""
    done = subprocess.run(["bash", "-c", line], cwd=session.workdir, env=session.env(), capture_output=True,
                          text=True, timeout=300)
    session.last_output = done.stdout + done.stderr
    assert done.returncode == 0, f"{block.where}: `{line}` exited {done.returncode}:\n{session.last_output}"
    return done.stdout


def start_server(session: Session, block: Block, args: list[str]) -> None:
    """`offload serve ...` in the background on a free port, until the document ends; returns once healthy."""
    session.close()
    session.port = str(free_port())
    log = session.workdir / "serve.log"
    with log.open("w") as out:
        session.server = subprocess.Popen([sys.executable, "-m", "cli.main", *args, "--port", session.port],
                                          cwd=session.workdir, env=session.env(), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        assert session.server.poll() is None, f"{block.where}: offload serve exited: {log.read_text()}"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{session.port}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"{block.where}: offload serve was not healthy within {START_S}s: {log.read_text()}")


def run_shell_block(session: Session, block: Block) -> None:
    for line in shell_lines(session.text(block.text)):
        for segment in (s.strip() for s in line.split(" && ")):
            if ENVIRONMENT.match(segment):
                session.skipped.append(f"{block.where}: {segment}")
                continue
            feed, _, command = segment.rpartition(" | ")
            words = shlex.split(command or segment, comments=True)
            if words[:2] == ["offload", "serve"] and words[-1] == "&":
                start_server(session, block, words[1:-1])
            elif words[0] == "offload" and not SHELL.search(command.split("#")[0]):
                # `offload ...`, or `printf ... | offload ...`: the command in this process, fed what bash printed
                run_cli(session, block, words[1:], run_bash(session, block, feed) if feed else None)
            else:
                run_bash(session, block, segment)


def run_python_block(session: Session, block: Block) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(session.text(block.text), block.where, "exec"), session.namespace)  # noqa: S102 - the docs' code
    session.last_output = out.getvalue()


def check_output(session: Session, block: Block) -> None:
    assert normalised(block.text) == normalised(session.last_output), \
        f"{block.where}: the output shown is not what the command printed:\n{session.last_output}"


def _git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


def _gguf_example(workdir: Path) -> None:
    from tests.offload.runtime.test_gguf_runtime import write_tiny_gguf

    (workdir / "gguf-build").mkdir()
    write_tiny_gguf(workdir / "gguf-build").rename(workdir / "model.gguf")


# What a document's examples need that the clone does not hold, made in the working folder before its blocks run.
SETUP = {"docs/gguf.md": _gguf_example}


@pytest.mark.parametrize("doc", [str(d.relative_to(ROOT)) for d in DOCS])
def test_every_example_in_the_document_runs(doc, tmp_path, monkeypatch):
    before = _git_status()
    session = _session(tmp_path)
    monkeypatch.chdir(session.workdir)
    if doc in SETUP:
        SETUP[doc](session.workdir)
    try:
        for block in (b for b in ALL_BLOCKS if b.doc == doc):
            if block.marker.startswith("not run"):
                continue
            if block.marker == "output":
                check_output(session, block)
            elif block.lang == "bash":
                run_shell_block(session, block)
            elif block.lang == "python":
                run_python_block(session, block)
    finally:
        session.close()
    assert _git_status() == before, f"running {doc}'s examples changed files in the clone"


def test_every_block_says_what_it_is():
    """A language on every fence (so a block is run or knowingly not), and markers only where they mean something."""
    for block in ALL_BLOCKS:
        assert block.lang in LANGUAGES, f"{block.where}: tag the block with one of {sorted(LANGUAGES)}"
        if block.marker == "output":
            assert block.lang == "text", f"{block.where}: an output is a ```text block"
        elif block.marker:
            assert block.marker.startswith("not run: ") and len(block.marker) > len("not run: "), \
                f"{block.where}: unknown marker {block.marker!r} (use 'not run: REASON' or 'output')"


def test_the_blocks_not_run_are_exactly_the_listed_ones():
    found = {(b.doc, b.first_line): b.marker.removeprefix("not run: ") for b in ALL_BLOCKS
             if b.marker.startswith("not run")}
    assert found == NOT_RUN


def test_text_blocks_hide_no_command():
    """A ```text block with lines that start like commands must be a synopsis (it names PLACEHOLDERS): a command a
    user would paste belongs in a ```bash block, which runs."""
    for block in (b for b in ALL_BLOCKS if b.lang == "text"):
        commands = [line for line in block.text.splitlines() if re.match(r"\s*(offload|python3?|curl) ", line)]
        if commands:
            assert re.search(r"\b[A-Z]{3,}\b", block.text), f"{block.where}: `{commands[0]}` is a command: use ```bash"


def test_the_readme_is_short_and_starts_with_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    setup = next(b for b in ALL_BLOCKS if b.doc == "README.md" and b.lang == "bash")
    assert shell_lines(setup.text) == [
        "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . && "
        'offload run tiny-moe "def fibonacci(n):" --expert-budget 25%',
        "pip install -e '.[test]' && python -m pytest -q -n 2",  # what CI runs
    ]
    following = ALL_BLOCKS[ALL_BLOCKS.index(setup) + 1]
    assert following.marker == "output", "README shows what command 1 prints, right after the commands"


LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_PATH = re.compile(r"`((?:offload|predictors|cli|scripts|tests|docs)/[\w./*-]+)")


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", doc.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_and_named_paths_exist():
    """Every relative link (and its #anchor) and every repository path named in code spans points at something:
    the module paths and result files the docs cite are what moved and rotted before."""
    wrong = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                wrong.append(f"{doc.name}: link {target}")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                wrong.append(f"{doc.name}: no heading #{anchor} in {file.relative_to(ROOT)}")
        for path in CODE_PATH.findall(text):
            if not list(ROOT.glob(path.rstrip("/"))):
                wrong.append(f"{doc.name}: `{path}` does not exist")
    assert not wrong, "\n".join(wrong)
