"""`offload chat`: an interactive terminal chat. Replies stream as they are generated; the conversation goes
through the checkpoint's chat template each turn (offload/serve/chat.py, as the server's chat endpoint does).

Ctrl-C during a reply stops it at the next token (the signal only sets a flag: stopping inside a forward pass
would leave the expert cache's pins mid-layer) and keeps the session, the partial reply in the history as the
user saw it; Ctrl-C at the prompt only reminds how to leave; Ctrl-D (end of input) leaves.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer
from rich.console import Console
from rich.table import Table

from offload.serve.textstream import TextStream

from .load import load_model
from .options import Context, ModelArg, RuntimeOptions, Seed, Temperature, TopP, with_runtime_options

if TYPE_CHECKING:
    import torch

err = Console(stderr=True, highlight=False, soft_wrap=True)
COMMANDS = "/reset forgets the conversation, /stats shows the expert cache's counters, /help lists these, /exit or " \
           "Ctrl-D leaves; Ctrl-C stops a reply; arrow keys edit the line and recall earlier ones"


class _Stopped(Exception):
    """Raised by the streamer at a token boundary once Ctrl-C was pressed."""


class ReplyStreamer:
    """generate()'s streamer for one reply: writes its text as it arrives and stops once ``interrupted`` is set."""

    def __init__(self, tokenizer: Any, out: TextIO, interrupted: threading.Event) -> None:
        self.stream = TextStream(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        self.out, self.interrupted = out, interrupted
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True  # generate() hands the prompt over first
            return
        for token in value.reshape(-1).tolist():
            self._write(self.stream.push(token)[0])
        if self.interrupted.is_set():
            raise _Stopped

    def end(self) -> None:
        self._write(self.stream.finish())

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()


@dataclass
class ChatSession:
    """A conversation with one loaded model: the history, rendered through its template each turn."""

    model: Any  # OffloadModel
    template: Any  # ChatTemplate
    sampling: Any  # SamplingConfig
    context: int
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.history.clear()

    def reply(self, text: str, out: TextIO, interrupted: threading.Event) -> tuple[str, bool]:
        """Generate the assistant's answer to ``text`` (streamed to ``out``); (reply, stopped by Ctrl-C).

        Raises ContextError when the conversation no longer leaves room in the context for a reply."""
        import torch

        from offload.errors import ContextError
        from offload.serve.chat import encode_chat

        system = [{"role": "system", "content": self.system}] if self.system else []
        turn = {"role": "user", "content": text}
        ids = encode_chat(self.model.tokenizer, self.template.render([*system, *self.history, turn]))
        room = min(self.sampling.max_new_tokens, self.context - len(ids))
        if room < 1:
            raise ContextError(f"the conversation is {len(ids)} tokens and the context holds {self.context}",
                               "/reset to start over, or give a larger --context")
        streamer = ReplyStreamer(self.model.tokenizer, out, interrupted)
        try:
            self.model.generate(torch.tensor([ids]), sampling=self.sampling, streamer=streamer, max_new_tokens=room)
            stopped = False
        except _Stopped:
            stopped = True
        self.history += [turn, {"role": "assistant", "content": streamer.stream.text}]
        return streamer.stream.text, stopped


@contextmanager
def _ctrl_c_sets(flag: threading.Event) -> Iterator[None]:
    """While a reply runs, SIGINT sets ``flag`` instead of raising KeyboardInterrupt mid-forward."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda sig, frame: flag.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stats_table(m: Any) -> Table:
    t = m.stats.total
    table = Table(show_header=False, box=None)
    for key, value in (("expert slots", f"{m.cache.num_slots} of {m.spec.total_experts}"),
                       ("hits / misses", f"{t.hits} / {t.misses} ({t.hit_rate:.1%} hit rate)"),
                       ("evictions", str(t.evictions)), ("loaded", f"{t.bytes_loaded / 2**20:.1f} MiB"),
                       ("stalls", f"{t.stalls} ({t.stall_time_s:.2f}s)"),
                       ("decode", f"{m.stats.decode_tokens} tokens at {m.stats.decode_tokens_per_s:.2f} tokens/s")):
        table.add_row(f"[bold]{key}[/bold]", value)
    return table


def line_editing() -> bool:
    """Give input() line editing and this session's history (arrow keys) where the terminal allows: importing
    readline is what does it. Nothing is written to disk: the history lives as long as the session."""
    if not sys.stdin.isatty():
        return False
    try:
        import readline  # noqa: F401 - imported for its effect on input()
    except ImportError:  # Windows without pyreadline: plain input
        return False
    return True


def converse(session: ChatSession, console: Console) -> None:
    """The read-reply loop, until end of input or /exit."""
    from offload.errors import OffloadError

    line_editing()
    while True:
        try:
            line = console.input("[bold cyan]>>> [/bold cyan]")
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            err.print("\n(/exit or Ctrl-D leaves)")
            continue
        text = line.strip()
        if text in ("/exit", "/quit", "/bye"):
            return
        if text == "/reset":
            session.reset()
            err.print("[dim]conversation forgotten[/dim]")
        elif text == "/stats":
            console.print(stats_table(session.model))
        elif text in ("/help", "/?"):
            err.print(COMMANDS)
        elif text.startswith("/"):
            err.print(f"unknown command {text.split()[0]}: {COMMANDS}")
        elif text:
            interrupted = threading.Event()
            try:
                with _ctrl_c_sets(interrupted):
                    _, stopped = session.reply(line, console.file, interrupted)
            except OffloadError as e:
                err.print(f"Error: {e.message}" + (f" (hint: {e.hint})" if e.hint else ""))
                continue
            console.print(" [dim](stopped)[/dim]" if stopped else "")


@with_runtime_options()
def chat(
    model: ModelArg,
    runtime: RuntimeOptions,
    context: Context = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per reply.")] = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = None,
    system: Annotated[str | None, typer.Option(help="A system message that opens the conversation.")] = None,
) -> None:
    """Chat with MODEL in the terminal: replies stream, the history goes through its chat template.

    /reset forgets the conversation, /stats shows the expert cache's counters, /exit or Ctrl-D leaves;
    Ctrl-C stops a reply and keeps the session.
    """
    from offload.errors import ConfigError
    from offload.memory.budget import kv_context
    from offload.serve.chat import resolve_chat_template

    if max_new_tokens < 1 or temperature < 0:
        raise ConfigError("--max-new-tokens must be >= 1 and --temperature >= 0", "0 means greedy")
    m = load_model(model, runtime.config(batch_size=1, context=context))
    if m.tokenizer is None:
        raise ConfigError(f"{m.plan.path} has no tokenizer.json", "offload chat needs one to read and write text")
    template = resolve_chat_template(m.plan.path, m.plan.metadata)
    sampling = m.sampling_config(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                 temperature=temperature or 1.0, top_p=top_p, seed=seed)
    session = ChatSession(m, template, sampling, kv_context(m.spec, context), system)
    where = "a plain fallback template" if template.is_fallback else template.origin
    err.print(f"chatting with {model} through {where}; {COMMANDS}", soft_wrap=True)
    converse(session, Console(file=sys.stdout, highlight=False))
    m.cache.close()
