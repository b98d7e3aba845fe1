"""cli/serve.py: SIGINT / SIGTERM end a serving process cleanly (exit 0, within seconds, a running stream
ended), and the failures before or while loading are one line. Loops are bounded; addresses are 127.0.0.1."""

from __future__ import annotations

import json
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
    """A long streamed request; records its lines (the server stops under it)."""
    body = {"model": "mixtral", "prompt": "def f(x):", "max_tokens": 119, "stream": True}
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=REQUEST_S) as r:
            out.extend(r.iter_lines())
    except httpx.HTTPError as e:  # the connection closed under it: what must no longer happen
        out.append(f"closed: {type(e).__name__}")


def test_a_signal_ends_every_open_stream_with_its_last_chunk_and_done(model_dir, tmp_path):
    # SIGTERM, as a process manager sends it (SIGINT takes the same path through uvicorn, and stop_server sends
    # it at the end of every server test); no grace period: the running streams are ended at once (with the
    # default 3 s they may finish first)
    log, sig = tmp_path / "serve.log", signal.SIGTERM
    proc, base = start_server(model_dir, log, "--shutdown-timeout", "0")
    outs: list[list[str]] = [[], [], []]
    readers = [threading.Thread(target=_stream, args=(base, out), daemon=True) for out in outs]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + REQUEST_S
    while not all(outs) and time.monotonic() < deadline:   # wait until all three are streaming
        time.sleep(0.05)
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=30)  # a liveness bound, not a speed claim: the grace period is 0 here, 3 s by default
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log.read_text()
    ended = []
    for reader, out in zip(readers, outs):
        reader.join(REQUEST_S)
        events = [line for line in out if line]
        assert not reader.is_alive() and events[-1] == "data: [DONE]", events[-3:]
        last = json.loads(events[-2].removeprefix("data: "))   # the stream's final chunk: an error saying why
        if "error" in last:
            assert last["error"]["message"] == "the server is stopping; the request was cancelled", last
            ended.append(last)
        else:                                                  # (it finished in the instant before the signal)
            assert last["choices"][0]["finish_reason"] in ("length", "stop"), last
    assert ended                                               # the signal did end streams that were running
    text = log.read_text()
    assert f"stopped by {sig.name}" in text and "Traceback" not in text and "CancelledError" not in text, text
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


def test_the_api_key_from_a_file_and_what_is_refused_before_loading(model_dir, tmp_path):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "key").write_text("sk-1\n")
    port = str(free_port())
    both = runner.invoke(app, ["serve", str(model_dir), "--port", port, "--api-key", "x", "--api-key-file",
                               str(tmp_path / "key")])
    empty = runner.invoke(app, ["serve", str(model_dir), "--port", port, "--api-key-file", str(tmp_path / "empty")])
    missing = runner.invoke(app, ["serve", str(model_dir), "--port", port, "--api-key-file", str(tmp_path / "no")])
    bad_limit = runner.invoke(app, ["serve", str(model_dir), "--port", port, "--max-request-bytes", "0"])
    for result, line in ((both, "Error: give --api-key (or OFFLOAD_API_KEY) or --api-key-file, not both"),
                         (empty, f"Error: --api-key-file {tmp_path / 'empty'} is empty"),
                         (missing, f"Error: --api-key-file {tmp_path / 'no'} cannot be read"),
                         (bad_limit, "Error: invalid --max-request-bytes 0")):
        assert result.exit_code == 1 and result.stderr.startswith(line) and "loading" not in result.stderr, \
            result.output


def test_a_reachable_server_without_a_key_is_warned_about(model_dir):
    # --port 70000 fails after the warning and before anything listens (the tests never listen beyond 127.0.0.1)
    result = runner.invoke(app, ["serve", str(model_dir), "--host", "0.0.0.0", "--port", "70000"])
    assert result.exit_code == 1 and result.stderr.splitlines() == [
        "Warning: serving on 0.0.0.0 without an API key: anyone who can reach this port can use the model (set "
        "OFFLOAD_API_KEY or --api-key-file)", "Error: invalid --port 70000 (hint: give a port in 0..65535)"]
    keyed = runner.invoke(app, ["serve", str(model_dir), "--host", "0.0.0.0", "--port", "70000", "--api-key", "k"])
    assert "Warning" not in keyed.stderr and "visible to other users of this machine (ps)" in keyed.stderr
    local = runner.invoke(app, ["serve", str(model_dir), "--port", "70000"], env={"OFFLOAD_API_KEY": "k"})
    assert local.stderr.splitlines() == ["Error: invalid --port 70000 (hint: give a port in 0..65535)"]
