"""Concurrent streaming clients against `offload serve` on the bundled model, fifo vs expert-aware (issue 15).

For each scheduler a fresh `offload serve` process (127.0.0.1, a free port) serves held-out stdlib code prompts
(see make_trace_prompts.py). At each concurrency level, that many client threads each send --requests
streamed greedy completions one after another (every loop is bounded by these counts and every request by
--timeout) and time each Server-Sent Event. Reported per (level, scheduler): aggregate generated tokens/s over
the level's wall time, time to first token and inter-token latency p50 / p95, and expert loads per generated
token (the /metrics cache-miss counter over the level). Greedy text must not depend on the scheduler or on
the other requests; the script checks it and records the answer.

    python scripts/bench_serve.py --clients 1,4,16 --requests 2 --max-tokens 32 \
        --out scripts/results/bench_serve.json      # and bench_serve.md beside it
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import httpx
import numpy as np
import typer
from common import ROOT, err, machine_info, main, make_app, write_json, write_text
from make_trace_prompts import code_snippets  # a sibling script: scripts/ is on sys.path, as common is

app = make_app(__doc__.splitlines()[0], no_args_is_help=False)  # bare: the benchmark at its default scale
START_S = 180  # a server must answer /health within this


@dataclass(frozen=True)
class Options:
    """Every option of the run, as given (recorded as the JSON's params)."""

    model: str
    clients: str
    requests: int
    max_tokens: int
    chars: int
    budget: str
    schedulers: str
    max_batch: int
    max_wait: int
    offload_to: str
    device: str
    threads: int
    timeout: float
    out: Path


@dataclass(frozen=True)
class Sample:
    """One streamed request as its client saw it (seconds since it was sent)."""

    prompt: int
    text: str
    tokens: int          # completion tokens, from the usage chunk
    first_token_s: float
    gaps_s: tuple[float, ...]  # between consecutive content events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(opts: Options, scheduler: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "cli.main", "serve", opts.model, "--port", str(port), "--device", opts.device,
            "--expert-budget", opts.budget, "--offload-to", opts.offload_to, "--max-batch", str(opts.max_batch),
            "--scheduler", scheduler, "--max-wait", str(opts.max_wait)]
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads)}
    log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while the server runs
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=30)
    log.seek(0)
    raise RuntimeError(f"offload serve did not start: {log.read()[-2000:]}")


def stream_one(base: str, model: str, index: int, prompt: str, max_tokens: int, timeout: float) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    times, texts, tokens = [], [], 0
    start = time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter() - start)
                texts.append(chunk["choices"][0]["text"])
    return Sample(index, "".join(texts), tokens, times[0] if times else float("nan"),
                  tuple(np.diff(times).tolist()))


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}


def run_level(opts: Options, base: str, name: str, prompts: list[str], clients: int) -> tuple[list[Sample], float]:
    """``clients`` threads, each sending ``opts.requests`` streamed requests in turn; (samples, wall seconds)."""
    samples: list[Sample] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(opts.requests):
            index = c * opts.requests + r
            sample = stream_one(base, name, index, prompts[index], opts.max_tokens, opts.timeout)
            with lock:
                samples.append(sample)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(opts.timeout * opts.requests)
    return sorted(samples, key=lambda s: s.prompt), time.perf_counter() - start


def percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summarize(samples: list[Sample], wall_s: float, loads: float, clients: int, scheduler: str) -> dict:
    """One (level, scheduler) record: throughput, latency percentiles (ms), loads per token."""
    tokens = sum(s.tokens for s in samples)
    ttft = np.array([s.first_token_s for s in samples]) * 1000
    gaps = np.array([g for s in samples for g in s.gaps_s]) * 1000
    return {"clients": clients, "scheduler": scheduler, "requests": len(samples), "tokens": tokens,
            "wall_s": round(wall_s, 3), "tokens_per_s": tokens / wall_s if wall_s else 0.0,
            "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p95": percentile(ttft, 95),
            "itl_ms_p50": percentile(gaps, 50), "itl_ms_p95": percentile(gaps, 95), "expert_loads": loads,
            "loads_per_token": loads / tokens if tokens else 0.0}


def run_scheduler(opts: Options, scheduler: str, levels: list[int], prompts: list[str]) -> tuple[list[dict], dict]:
    """A fresh server for ``scheduler``; every level's record, and each request's text by (level, prompt)."""
    proc, base = start_server(opts, scheduler)
    name = opts.model if not Path(opts.model).is_dir() else Path(opts.model).resolve().name
    try:
        stream_one(base, name, 0, prompts[0], 4, opts.timeout)  # warm-up: kernels, allocator
        records, texts = [], {}
        for clients in levels:
            before = metrics(base)
            samples, wall = run_level(opts, base, name, prompts, clients)
            loads = metrics(base)["offload_cache_misses_total"] - before["offload_cache_misses_total"]
            record = summarize(samples, wall, loads, clients, scheduler)
            err.print(f"{scheduler:13s} {clients:3d} clients: {record['tokens_per_s']:.1f} tok/s, TTFT p50 "
                      f"{record['ttft_ms_p50']:.0f} ms, ITL p50 {record['itl_ms_p50']:.1f} ms, "
                      f"{record['loads_per_token']:.2f} loads/token", soft_wrap=True)
            records.append(record)
            texts |= {f"{clients}:{s.prompt}": s.text for s in samples}
        return records, texts
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def table(runs: list[dict], base_scheduler: str) -> str:
    """Markdown: one row per (clients, scheduler), with tokens/s and loads/token as ratios to the base."""
    base = {r["clients"]: r for r in runs if r["scheduler"] == base_scheduler}
    lines = ["| clients | scheduler | tokens/s | TTFT p50 / p95 (ms) | inter-token p50 / p95 (ms) "
             f"| expert loads / token | vs {base_scheduler} (tok/s, loads/token) |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        b = base.get(r["clients"], r)
        ratio = (f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
                 f"{r['loads_per_token'] / b['loads_per_token']:.2f}x" if b["loads_per_token"] else "-")
        lines.append(f"| {r['clients']} | {r['scheduler']} | {r['tokens_per_s']:.1f} | {r['ttft_ms_p50']:.0f} / "
                     f"{r['ttft_ms_p95']:.0f} | {r['itl_ms_p50']:.1f} / {r['itl_ms_p95']:.1f} | "
                     f"{r['loads_per_token']:.2f} | {ratio} |")
    return "\n".join(lines)


@app.command()
def bench(
    model: Annotated[str, typer.Option(help="Checkpoint folder, hub id or bundled model name.")] = "tiny-moe",
    clients: Annotated[str, typer.Option(help="Concurrency levels, comma-separated.")] = "1,4,16",
    requests: Annotated[int, typer.Option(help="Streamed requests per client, one after another.")] = 4,
    max_tokens: Annotated[int, typer.Option(help="Greedy tokens per request.")] = 64,
    chars: Annotated[int, typer.Option(help="Characters per prompt.")] = 200,
    budget: Annotated[str, typer.Option(help="The server's --expert-budget.")] = "25%",
    schedulers: Annotated[str, typer.Option(help="Comma-separated; ratios are to the first.")] = "fifo,expert-aware",
    max_batch: Annotated[int, typer.Option(help="The server's --max-batch.")] = 8,
    max_wait: Annotated[int, typer.Option(help="The server's --max-wait.")] = 4,
    offload_to: Annotated[str, typer.Option(help="disk or ram.")] = "disk",
    device: Annotated[str, typer.Option(help="The server's --device.")] = "cpu",
    threads: Annotated[int, typer.Option(
        help="The server's torch threads (OMP_NUM_THREADS); 1: two spin against other work on a shared 2-core "
             "machine (bench_serve-threads2.json ran 5-25x slower).")] = 1,
    timeout: Annotated[float, typer.Option(help="Seconds one request may take.")] = 300.0,
    out: Annotated[Path, typer.Option(help="JSON file to write (a .md table beside it).")] = Path(
        "scripts/results/bench_serve.json"),
) -> None:
    """Tokens/s, time to first token, inter-token latency and loads/token per concurrency level and scheduler."""
    opts = Options(**locals())  # every parameter above, nothing else yet
    levels = [int(c) for c in clients.split(",")]
    names = [s.strip() for s in schedulers.split(",")]
    prompts = code_snippets(Path(sysconfig.get_paths()["stdlib"]), max(levels) * requests, chars)
    load_before = list(os.getloadavg())
    runs, texts = [], {}
    for scheduler in names:
        records, texts[scheduler] = run_scheduler(opts, scheduler, levels, prompts)
        runs += records
    same = all(t == texts[names[0]] for t in texts.values())
    by_prompt: dict[str, set[str]] = {}
    for key, text in texts[names[0]].items():
        by_prompt.setdefault(key.split(":")[1], set()).add(text)
    same_alone = all(len(v) == 1 for v in by_prompt.values())  # a prompt's text at every concurrency level
    markdown = table(runs, names[0])
    print(markdown)
    print(f"\nevery request's text identical under every scheduler: {same}; at every concurrency: {same_alone}")
    load = list(os.getloadavg())
    write_json(out, {"benchmark": "bench_serve", "command": " ".join(sys.argv),
                     "params": {k: str(v) for k, v in asdict(opts).items()}, "machine": machine_info(),
                     "loadavg_before": load_before, "loadavg_after": load, "same_text_under_every_scheduler": same,
                     "same_text_at_every_concurrency": same_alone, "runs": runs, "table": markdown})
    write_text(out.with_suffix(".md"),
               f"{markdown}\n\nload average (1, 5, 15 min) before the run: {load_before}, after: {load}\n")
    err.print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main(app)
