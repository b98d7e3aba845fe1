"""cli/chat.py driven through piped input (typer's CliRunner): replies equal generate() on the template-rendered
conversation, turn after turn; /reset, /stats and unknown commands; Ctrl-C stops a reply and keeps the session."""

from __future__ import annotations

import io
import shutil
import threading

import pytest
import torch
from typer.testing import CliRunner

import offload
from cli.chat import ChatSession, ReplyStreamer
from cli.main import app
from offload.errors import ContextError
from offload.serve.chat import encode_chat, resolve_chat_template
from tests.tiny_models import add_char_tokenizer

runner = CliRunner()
TEMPLATE = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}>{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tiny_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("chat") / "mixtral"
    shutil.copytree(tiny_dir("mixtral"), dst)
    (dst / "chat_template.jinja").write_text(TEMPLATE)
    return add_char_tokenizer(dst)


@pytest.fixture(scope="module")
def model(model_dir):
    return offload.from_pretrained(model_dir, device="cpu")


def alone(model, model_dir, messages, tokens=8) -> str:
    ids = encode_chat(model.tokenizer, resolve_chat_template(model_dir).render(messages))
    out = model.generate(torch.tensor([ids]), max_new_tokens=tokens)
    return model.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def chat(model_dir, text: str, *options: str):
    return runner.invoke(app, ["chat", str(model_dir), "--device", "cpu", "--max-new-tokens", "8", *options],
                         input=text)


def test_turns_go_through_the_template_with_the_history(model, model_dir):
    first = alone(model, model_dir, [{"role": "user", "content": "hello"}])
    second = alone(model, model_dir, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                                      {"role": "user", "content": "tell me"}])
    result = chat(model_dir, "hello\ntell me\n/reset\nhello\n")
    assert result.exit_code == 0, result.output
    assert len(first) == 8 and len(second) > 3                # replies long enough to tell apart
    assert result.stdout.count(first) == 2 and second in result.stdout   # after /reset, as at first
    assert result.stdout.index(first) < result.stdout.index(second)
    assert "conversation forgotten" in result.stderr and "chatting with" in result.stderr


def test_a_system_message_opens_the_conversation(model, model_dir):
    expected = alone(model, model_dir, [{"role": "system", "content": "terse"}, {"role": "user", "content": "hello"}])
    result = chat(model_dir, "hello\n", "--system", "terse")
    assert result.exit_code == 0 and expected in result.stdout


def test_stats_help_unknown_commands_and_exit(model_dir):
    result = chat(model_dir, "/stats\n/help\n/what\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    assert "hits / misses" in result.stdout and "expert slots" in result.stdout
    assert "unknown command /what" in result.stderr and "unknown command /help" not in result.stderr
    assert result.stderr.count("/help lists these") == 3   # the greeting, /help, and the unknown command's hint


def test_a_terminal_gets_line_editing_and_history():
    # input() edits lines and recalls earlier ones (arrow keys) once readline is imported, which chat does on a
    # terminal only: under a pseudo-terminal here, not under a pipe
    import os
    import pty
    import subprocess
    import sys

    from tests.paths import ROOT

    code = "import sys; from cli.chat import line_editing; print(line_editing(), 'readline' in sys.modules)"
    controller, terminal = pty.openpty()
    with subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=terminal, stdout=subprocess.PIPE) as proc:
        os.close(terminal)
        out = proc.communicate(timeout=60)[0].decode().split()
    os.close(controller)
    piped = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out == ["True", "True"] and piped.stdout.split() == ["False", "False"]


def test_a_conversation_over_the_context_is_one_line_and_the_session_goes_on(model_dir):
    result = chat(model_dir, "x" * 40 + "\n/stats\n", "--context", "32")
    assert result.exit_code == 0, result.output
    assert "Error: the conversation is" in result.stderr and "/reset" in result.stderr
    assert "hits / misses" in result.stdout


class After:
    """An Event-like flag that reads as set from its n-th check on (Ctrl-C pressed mid-reply)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def is_set(self) -> bool:
        self.n -= 1
        return self.n < 0


def test_ctrl_c_stops_the_reply_at_a_token_and_keeps_the_session(model, model_dir):
    session = ChatSession(model, resolve_chat_template(model_dir), model.sampling_config(max_new_tokens=8), 256)
    full = alone(model, model_dir, [{"role": "user", "content": "hello"}])
    assert len(full) == 8                                   # this prompt's reply runs to the token limit
    out = io.StringIO()
    text, stopped = session.reply("hello", out, After(3))      # three tokens, then the flag is up
    assert stopped and full.startswith(text) and len(text) < len(full) and out.getvalue() == text
    assert session.history[-1] == {"role": "assistant", "content": text}
    nxt, stopped = session.reply("tell me", io.StringIO(), threading.Event())
    turn = {"role": "user", "content": "tell me"}
    assert not stopped and nxt == alone(model, model_dir, [*session.history[:-2], turn])


def test_the_reply_streamer_skips_the_prompt_and_holds_split_characters():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    out = io.StringIO()
    streamer = ReplyStreamer(Bytes(), out, threading.Event())
    streamer.put(torch.tensor([[65, 66]]))                   # the prompt: not written
    for b in "é!".encode():
        streamer.put(torch.tensor([b]))
    streamer.end()
    assert out.getvalue() == "é!"


def test_too_long_a_conversation_raises_context_error(model, model_dir):
    session = ChatSession(model, resolve_chat_template(model_dir), model.sampling_config(max_new_tokens=8), 10)
    with pytest.raises(ContextError, match="context holds 10"):
        session.reply("a long message", None, threading.Event())
