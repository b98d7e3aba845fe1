"""`offload serve`: the OpenAI-compatible server (offload/serve/server.py) on uvicorn, the model loading meanwhile."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from offload.errors import ConfigError, OffloadError

from .options import Context, ModelArg, RuntimeOptions, with_runtime_options

err = Console(stderr=True)



def served_name(model: str) -> str:
    """The model id clients use: a folder's name, else the name given (a bundled model, a hub repo id)."""
    path = Path(model)
    return path.resolve().name if path.is_dir() else model


def _check_port(host: str, port: int) -> None:
    """Fail with one line before loading anything when the address cannot be listened on."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"invalid --port {port}", "give a port in 0..65535")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e})",
                          "pick another --port, or stop what is using it") from None


@contextmanager
def _signals_end_quietly() -> Iterator[list[int]]:
    """uvicorn handles SIGINT / SIGTERM itself (stop accepting, let requests finish for --shutdown-timeout, shut down),
    then re-raises the signal at the handlers it found; these record it instead of raising KeyboardInterrupt
    or killing the process, so a stopped server exits 0 through the normal path."""
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, frame: caught.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _load_for_serving(model: str, runtime):
    import offload

    m = offload.from_pretrained(model, runtime)
    if m.tokenizer is None:
        raise ConfigError(f"{m.plan.path} has no tokenizer.json", "offload serve needs one to read and write text")
    return m


def api_key_of(api_key: str | None, api_key_file: Path | None) -> str | None:
    """The key from --api-key / OFFLOAD_API_KEY or from a file (its first line), never both."""
    if api_key_file is None:
        return api_key
    if api_key is not None:
        raise ConfigError("give --api-key (or OFFLOAD_API_KEY) or --api-key-file, not both")
    try:
        lines = api_key_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--api-key-file {api_key_file} cannot be read ({getattr(e, 'strerror', None) or e})",
                          "give a UTF-8 text file holding the key") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise ConfigError(f"--api-key-file {api_key_file} is empty", "write the key on its first line")
    return key


def _warn_about_exposure(host: str, api_key: str | None, key_from_argv: bool) -> None:
    """Say once, before loading, what a reachable server without a key (or a key in `ps`) means."""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if api_key is None and not local:
        err.print(f"Warning: serving on {host} without an API key: anyone who can reach this port can use the model "
                  "(set OFFLOAD_API_KEY or --api-key-file)", highlight=False, soft_wrap=True)
    if key_from_argv:
        err.print("Note: --api-key on the command line is visible to other users of this machine (ps); prefer "
                  "OFFLOAD_API_KEY or --api-key-file", highlight=False, soft_wrap=True)


@with_runtime_options()
def serve(
    model: ModelArg,
    runtime: RuntimeOptions,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Requests per decode step.")] = 8,
    scheduler: Annotated[str, typer.Option(help="How a step's batch is picked: fifo or expert-aware.")] = "fifo",
    max_wait: Annotated[int, typer.Option(help="Most steps a ready request is skipped by the scheduler.")] = 4,
    context: Context = 0,
    max_queue: Annotated[int, typer.Option(
        help="Requests that may wait for a KV row; more are refused with 503.")] = 64,
    api_key: Annotated[str | None, typer.Option(
        envvar="OFFLOAD_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 (or set OFFLOAD_API_KEY).")] = None,
    api_key_file: Annotated[Path | None, typer.Option(
        help="Read the API key from this file's first line (kept out of `ps`, unlike --api-key).")] = None,
    max_request_bytes: Annotated[int, typer.Option(
        help="Largest request body accepted; larger ones get 413 before they are read.")] = 4 * 2**20,
    max_tokens_default: Annotated[int, typer.Option(
        help="max_tokens of chat requests that give none (as llama-server's -n; completions keep OpenAI's 16).")
    ] = 512,
    shutdown_timeout: Annotated[float, typer.Option(
        help="After SIGINT / SIGTERM, seconds running requests get to finish before they are ended.")] = 3.0,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level (info logs every request).")] = "warning",
) -> None:
    """Serve MODEL with OpenAI's API: /v1/completions, /v1/chat/completions (streamed or not), /v1/models,
    /health and /metrics. Concurrent requests share decode steps (continuous batching)."""
    from offload.checkpoint.plan import plan_checkpoint
    from offload.memory.budget import is_auto
    from offload.serve.engine import Engine
    from offload.serve.server import ServerConfig, make_server

    runtime_config = runtime.config(scheduler=scheduler, batch_size=max_batch, max_wait=max_wait, context=context)
    if shutdown_timeout < 0:
        raise ConfigError(f"invalid --shutdown-timeout {shutdown_timeout}", "give seconds >= 0")
    key = api_key_of(api_key, api_key_file)
    _warn_about_exposure(host, key, api_key is not None and os.environ.get("OFFLOAD_API_KEY") != api_key)
    config = ServerConfig(served_name(model), key, max_request_bytes, max_tokens_default)
    _check_port(host, port)
    plan_checkpoint(model)  # a missing or broken checkpoint is one line now, not after the server is up

    def ready(m) -> None:
        budget = f"expert budget {'auto' if is_auto(runtime.expert_budget) else runtime.expert_budget}"
        err.print(f"serving {config.model_name} at http://{host}:{port}/v1 ({budget}: {m.cache.num_slots} of "
                  f"{m.spec.total_experts} experts; context {engine.context} tokens, batch {max_batch}, {scheduler})",
                  soft_wrap=True, highlight=False)

    engine = Engine(lambda: _load_for_serving(model, runtime_config), max_queue, on_ready=ready)
    err.print(f"loading {model} ...", highlight=False)
    _run(make_server(engine, config, host, port, shutdown_timeout, log_level), engine)


def _run(server, engine) -> None:
    """Run uvicorn until a signal, or until the engine fails (then its error is this command's error line)."""
    with _signals_end_quietly() as caught:
        server.run()
    if engine.error is not None:
        raise engine.error if isinstance(engine.error, OffloadError) else OffloadError(
            f"the engine failed ({type(engine.error).__name__}: {engine.error})", "see the log above")
    err.print(f"stopped{' by ' + signal.Signals(caught[0]).name if caught else ''}", highlight=False)
