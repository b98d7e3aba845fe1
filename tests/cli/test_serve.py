"""cli/serve.py: SIGINT / SIGTERM end a serving process cleanly (exit 0, within seconds, a running stream
ended), and the failures before or while loading are one line. Loops are bounded; addresses are 127.0.0.1."""

from __future__ import annotations

import shutil
import signal
import socket
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from cli.main import app
from cli.serve import served_name
from tests.serve_process import REQUEST_S, free_port, start_server
from tests.tiny_models import add_char_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tiny_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("cli-serve") / "mixtral"
    shutil.copytree(tiny_dir("mixtral"), dst)
    return add_char_tokenizer(dst)


def _stream(base: str, out: list) -> None:
    """A long streamed request; records how it ended (the server stops under it)."""
    body = {"model": "mixtral", "prompt": "def f(x):", "max_tokens": 119, "stream": True}
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=REQUEST_S) as r:
            out.extend(r.iter_lines())
    except httpx.HTTPError as e:  # the connection closed under it: also an ending
        out.append(f"closed: {type(e).__name__}")


def test_sigint_ends_the_server_cleanly_within_seconds(model_dir, tmp_path):
    # no grace period: the running stream is cancelled at once (with the default 3 s it may finish first)
    log, sig = tmp_path / "serve.log", signal.SIGINT
    proc, base = start_server(model_dir, log, "--shutdown-timeout", "0")
    out: list[str] = []
    reader = threading.Thread(target=_stream, args=(base, out), daemon=True)
    reader.start()
    deadline = time.monotonic() + REQUEST_S
    while not out and time.monotonic() < deadline:   # wait until it is streaming
        time.sleep(0.05)
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=10)  # a liveness bound, not a speed claim: the grace period is 0 here, 3 s by default
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log.read_text()
    reader.join(REQUEST_S)
    assert not reader.is_alive() and out            # the stream ended, one way or another
    assert f"stopped by {sig.name}" in log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/health", timeout=2)


def test_sigterm_is_handled_as_sigint():
    # uvicorn stops on either; what is left to this command is that the signal it re-raises afterwards
    # (at the handlers it found) neither kills the process nor raises KeyboardInterrupt
    from cli.serve import _signals_end_quietly

    with _signals_end_quietly() as caught:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
    assert caught == [signal.SIGTERM, signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_port_in_use_is_one_line_before_loading(model_dir):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", str(model_dir), "--port", str(port)])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith(f"Error: cannot listen on 127.0.0.1:{port}")
    assert "loading" not in result.stderr


def test_a_missing_model_is_one_line(tmp_path):
    result = runner.invoke(app, ["serve", str(tmp_path / "nothing"), "--port", str(free_port())])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "Error: " in result.stderr


def test_a_load_that_fails_ends_the_server_with_its_error(model_dir):
    # a context of 10^8 tokens: its KV cache leaves no memory for a single expert slot
    result = runner.invoke(app, ["serve", str(model_dir), "--port", str(free_port()), "--device", "cpu",
                                 "--context", "100000000"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: expert budget auto: not one expert slot fits")


def test_served_names(tmp_path):
    assert served_name(str(tmp_path)) == tmp_path.name and served_name("tiny-moe") == "tiny-moe"
    assert served_name("mistralai/Mixtral-8x7B-Instruct-v0.1") == "mistralai/Mixtral-8x7B-Instruct-v0.1"
