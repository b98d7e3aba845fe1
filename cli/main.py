"""The `offload` command line: thin, polite, one-line errors. All work is done by offload/."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from offload.errors import ConfigError
from offload.files import write_json_atomic, write_text_atomic

from .chat import chat
from .errors import OneLineErrors
from .hw import register as register_hw
from .load import load_model
from .options import LOADING, PATTERNS, ModelArg, RuntimeOptions, Seed, Temperature, TopP, with_runtime_options
from .patterns import register as register_patterns
from .serve import serve

err = Console(stderr=True)


app = typer.Typer(
    cls=OneLineErrors,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Run Mixture-of-Experts LLMs larger than your GPU or RAM with a bounded expert cache.",
)
register_hw(app)  # bench-hw, plan
register_patterns(app)  # profile


def _print_version(value: bool) -> None:
    if value:
        from offload.version import __version__

        print(f"offload {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version, help="Print the version and exit.")] = False) -> None:
    """Run Mixture-of-Experts LLMs larger than your GPU or RAM with a bounded expert cache."""



def _check_run_options(prompt: str | None, prompts_file: Path | None, out: Path | None,
                       stats_json: Path | None, max_new_tokens: int, temperature: float) -> None:
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {temperature}", "0 means greedy")
    if stats_json is not None and stats_json.is_dir():
        raise ConfigError(f"--stats-json {stats_json} is a directory", "give a file path")
    if (prompt is None) == (prompts_file is None):
        raise ConfigError("give either a PROMPT or --prompts-file",
                          'offload run MODEL "text" or offload run MODEL --prompts-file FILE')
    if out is not None and prompts_file is None:
        raise ConfigError("--out needs --prompts-file", "a single PROMPT streams to stdout")
    if out is not None and out.is_dir():
        raise ConfigError(f"--out {out} is a directory", "give a file path such as results.jsonl")


@app.command()
@with_runtime_options()
def run(
    model: ModelArg,
    runtime: RuntimeOptions,
    prompt: Annotated[str | None, typer.Argument(
        help="Text to continue ('-': read it from stdin; or use --prompts-file).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="How many tokens to generate at most.")] = 64,
    temperature: Temperature = 0.0,
    top_k: Annotated[int | None, typer.Option(
        help="Sample among the k likeliest tokens (0: all; default: the checkpoint's generation config, else 50).")
    ] = None,
    top_p: TopP = 1.0,
    seed: Seed = None,
    stats_json: Annotated[Path | None, typer.Option(help="Write the run's statistics to this JSON file.")] = None,
    prompts_file: Annotated[Path | None, typer.Option(
        help="Many prompts: .txt (one per line) or .jsonl; batched.")] = None,
    out: Annotated[Path | None, typer.Option(help="With --prompts-file: JSONL results file (default: stdout).")] = None,
    batch_size: Annotated[int, typer.Option(help="With --prompts-file: requests per decode step.")] = 8,
    scheduler: Annotated[str, typer.Option(help="With --prompts-file: fifo or expert-aware.")] = "fifo",
    max_wait: Annotated[int, typer.Option(help="With --prompts-file: most steps a ready request is skipped.")] = 4,
    chat: Annotated[bool, typer.Option(
        "--chat", help="Send PROMPT (each prompt) as a user message through the model's chat template.")] = False,
) -> None:
    """Generate a continuation of PROMPT, streamed to stdout; statistics go to stderr.

    With --prompts-file, every prompt is generated with continuous batching and one JSON object per
    prompt (id, prompt, completion, token counts) is written, in the file's order, to --out or stdout.
    With --chat, PROMPT is rendered as a conversation by the checkpoint's chat template and only the
    reply is printed.
    """
    from offload.files import read_prompts

    _check_run_options(prompt, prompts_file, out, stats_json, max_new_tokens, temperature)
    if prompt == "-":
        prompt = _stdin_prompt()
    texts = read_prompts(prompts_file) if prompts_file is not None else None
    m = load_model(model, runtime.config(scheduler=scheduler, batch_size=batch_size, max_wait=max_wait,
                                         context=_run_context(texts or [prompt], max_new_tokens)))
    sampling = m.sampling_config(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                 temperature=temperature or 1.0, top_k=top_k, top_p=top_p, seed=seed)
    if texts is not None:
        _run_many(m, texts, out, sampling, chat)
    else:
        _run_one(m, prompt, sampling, chat)
    m.cache.close()
    err.print(f"[dim]{m.cache.num_slots} of {m.spec.total_experts} experts cached ({m.runtime.offload_to} tier, "
              f"{m.runtime.policy}, predictor {m.runtime.predictor}); {m.stats.summary()}[/dim]", soft_wrap=True)
    if stats_json is not None:
        write_json_atomic(stats_json, {"model": str(m.plan.path), "expert_slots": m.cache.num_slots,
                                       "total_experts": m.spec.total_experts, **m.stats.to_dict()})


def _stdin_prompt() -> str:
    """The prompt piped in (`offload run MODEL -`), without the one newline that ends a line of input."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"the prompt on stdin is not UTF-8 text (byte {e.start})", "pipe in UTF-8 text") from None
    text = text.removesuffix("\n")
    if not text:
        raise ConfigError("the prompt on stdin is empty", 'e.g. echo "def f(x):" | offload run MODEL -')
    return text


def _run_context(prompts: list[str], max_new_tokens: int) -> int:
    """Tokens per sequence for the auto budget's KV cache: a prompt's UTF-8 bytes bound its tokens (byte-level
    and character tokenizers never give more), plus the new tokens and a few special ones."""
    return max(len(p.encode()) for p in prompts) + max_new_tokens + 16


def _prompt_ids(m, prompt: str, chat: bool) -> list[int]:
    """A prompt's token ids: as text (the tokenizer adds its special tokens) or as a one-message chat."""
    from offload.serve.chat import encode_chat, resolve_chat_template

    if not chat:
        return m.encode(prompt)[0].tolist()
    text = resolve_chat_template(m.plan.path, m.plan.metadata).render([{"role": "user", "content": prompt}])
    return encode_chat(m.tokenizer, text)


def _run_one(m, prompt: str, sampling, chat: bool = False) -> None:
    import torch

    from offload.runtime.generate import TextStreamer, check_length

    ids = torch.tensor([_prompt_ids(m, prompt, chat)])
    check_length(m.spec, ids.shape[1], sampling.max_new_tokens)  # before the prompt is echoed
    if not chat:
        sys.stdout.write(prompt)
    m.generate(ids, sampling=sampling, streamer=TextStreamer(m.tokenizer))


def _run_many(m, texts: list[str], out: Path | None, sampling, chat: bool = False) -> None:
    """Batched generation of every prompt with a progress bar; JSON lines in the prompts' order."""
    progress = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True, disable=not err.is_terminal)
    prompts = [_prompt_ids(m, t, chat) for t in texts] if chat else texts
    with progress:
        task = progress.add_task("generating", total=len(texts))
        results = m.generate_many(prompts, sampling, on_finish=lambda c: progress.advance(task))
    for c, text in zip(results, texts):
        c.prompt = text
    lines = "".join(json.dumps(c.to_dict()) + "\n" for c in results)
    if out is None:
        sys.stdout.write(lines)
    else:
        write_text_atomic(out, lines)  # never leave a half-written results file under the user's name
    t, tokens = m.stats.total, sum(c.completion_tokens for c in results)
    err.print(f"[dim]{len(results)} prompts, {tokens} tokens; {t.distinct_per_step:.2f} distinct experts per layer "
              f"per step, {t.misses / max(tokens, 1):.2f} expert loads per generated token[/dim]", soft_wrap=True)


def _gib(n: float) -> str:
    """Bytes in the largest unit that keeps them at or above 1 (a 48 KiB expert is not "0.0 MiB")."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


@app.command()
def info(model: ModelArg, patterns: Annotated[Path | None, typer.Option(
        help="A patterns file of this model (`offload profile`): how many experts per layer hold 50/80/95% of "
             "each task's routing mass, the number --prune needs.")] = None) -> None:
    """Describe a checkpoint: family, sizes, and the expert budget this machine's memory holds (what --expert-budget
    auto would take for run, serve and chat with their defaults)."""
    import torch

    from offload.checkpoint.locate import resolve_model_dir
    from offload.checkpoint.plan import plan_checkpoint, plan_config
    from offload.memory.patterns import load_patterns
    from offload.runtime.load import identity

    from .patterns import coverage_table, prune_hint

    path = resolve_model_dir(model, weights=False)
    config_only = (path / "config.json").is_file() and not any(
        (path / name).exists() for name in ("model.safetensors", "model.safetensors.index.json"))
    plan = plan_config(path) if config_only else plan_checkpoint(path)
    spec = plan.spec
    per_expert = plan.expert_nbytes if config_only else plan.expert_nbytes()
    slot = plan.expert_format.slot_layout(spec, spec.checkpoint_dtype, torch.device("cpu"), "int8").nbytes
    experts_total = per_expert * spec.total_experts
    table = Table(show_header=False, box=None)
    rows = [
        ("path", str(plan.path) + ("  (config.json only: sizes estimated)" if config_only else "")),
        ("family", f"{spec.family} ({spec.architecture})"),
        ("layers", f"{spec.num_layers} ({spec.num_moe_layers} MoE)"),
        ("experts", f"{spec.num_experts} per MoE layer, top-{spec.top_k}, {spec.total_experts} in all"),
        *_attention_rows(plan),
        ("dtype", str(spec.checkpoint_dtype).removeprefix("torch.")), ("expert format", plan.expert_format.name),
        *([] if config_only else [("stored as", "; ".join(f"{k} {v}" for k, v in plan.stored_types().items()))]),
        ("dense bytes", _gib(plan.dense_nbytes)), ("bytes per expert", f"{_gib(per_expert)} stored, "
                                                                      f"{_gib(slot)} in a CPU cache slot"),
        ("all experts", _gib(experts_total)), ("total", _gib(experts_total + plan.dense_nbytes)),
        *_fit_rows(plan),
    ]
    for k, v in rows:
        table.add_row(f"[bold]{k}[/bold]", v)
    Console().print(table)
    if patterns is not None:
        found = load_patterns(patterns)
        found.model.check(identity(plan), str(patterns))
        Console().print(coverage_table(found))
        Console().print(f"to keep 80% of every layer's routing mass: {prune_hint(found)}", highlight=False)


def _attention_rows(plan) -> list[tuple[str, str]]:
    """Each layer's attention piece, counted, and what one sequence keeps: keys and values per token of context,
    plus the fixed-size state of linear-attention layers (which does not grow with the context)."""
    from collections import Counter

    from offload.memory.budget import sequence_nbytes

    pieces = plan.family.layer_pieces(plan.spec)
    per_token, fixed = sequence_nbytes(plan.spec, plan.spec.checkpoint_dtype, pieces)
    kept = f"{_gib(per_token)} of keys and values per token of context" if per_token else "no keys or values"
    if fixed:
        kept += f" + {_gib(fixed)} of linear-attention state (constant in the context)"
    return [("attention", ", ".join(f"{n} x {piece}" for piece, n in Counter(pieces).items())),
            ("per sequence", kept)]


def _fit_rows(plan) -> list[tuple[str, str]]:
    """Per memory (host RAM; each GPU), what ``--expert-budget auto`` would take with run's defaults (disk tier,
    the model's context up to 4096, batch size 8), or why not one slot fits, with the numbers."""
    import torch

    from offload.hw.machine import gpu_memories, host_memory
    from offload.memory.budget import Placement, memory_plan

    spec, rows = plan.spec, []
    dtype = spec.checkpoint_dtype
    for i, memory in enumerate([host_memory(), *gpu_memories()]):
        device = torch.device("cpu") if i == 0 else torch.device("cuda", i - 1)
        mp = memory_plan(plan, Placement(device, dtype), memory=memory)
        why = mp.shortfall(spec.architecture)
        verdict = (f"does not fit: {why}" if why else
                   f"{mp.slots} experts ({mp.slots / spec.total_experts:.0%}) of {_gib(memory.available)} free -> "
                   f"--expert-budget {mp.slots} (what auto takes)")
        rows.append((f"fits in {memory.name}", verdict))
    return rows


@app.command()
@with_runtime_options(("device", "dtype"))
def trace(
    model: ModelArg,
    runtime: RuntimeOptions,
    prompts: Annotated[Path, typer.Option(
        help='Prompts: .txt (one per line) or .jsonl (strings or {"prompt": ...}).')],
    out: Annotated[Path, typer.Option(help="Trace file to write (offload-routing-trace/1; gzip'd if it ends in .gz).")],
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens generated per prompt.")] = 32,
    workload: Annotated[str, typer.Option(help="A name for the prompts, stored in the trace header.")] = "",
) -> None:
    """Record every token's experts and routing weights at every MoE layer (prefill and decode)."""
    from offload.files import read_prompts
    from offload.traces.recorder import record_trace

    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out} is a directory", "give a file path such as trace.jsonl.gz")
    texts = read_prompts(prompts)
    m = load_model(model, runtime.config())
    tokens = record_trace(m, texts, out, max_new_tokens=max_new_tokens, workload=workload or prompts.stem)
    err.print(f"wrote {tokens} tokens of {len(texts)} prompts to {out}", soft_wrap=True)


@app.command()
@with_runtime_options(LOADING + PATTERNS, expert_budget="100%")
def perplexity(
    model: ModelArg,
    runtime: RuntimeOptions,
    text: Annotated[Path, typer.Option(help="A UTF-8 text file to score.")],
    context: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    stride: Annotated[int, typer.Option(help="Tokens each window moves on (= context: no overlap).")] = 512,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write {perplexity, tokens, nll, ...} here.")] = None,
) -> None:
    """Token-level perplexity of a text file (sliding windows, as llama-perplexity and transformers' recipe)."""
    from offload.tools.perplexity import perplexity as score

    if not text.is_file():
        raise ConfigError(f"--text {text} does not exist", "give a UTF-8 text file")
    try:
        body = text.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--text {text} is not UTF-8 ({e.reason} at byte {e.start})", "convert it to UTF-8") from None
    m = load_model(model, runtime.config())
    ids = m.encode(body)[0].tolist()
    progress = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True, disable=not err.is_terminal)
    with progress:
        task = progress.add_task("scoring", total=None)
        result = score(m, ids, context, stride, progress=lambda d, t: progress.update(task, completed=d, total=t))
    print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens")
    if json_out is not None:
        write_json_atomic(json_out, {**result.to_dict(), "model": str(m.plan.path)})


@app.command()
def quantize(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="New checkpoint folder (must not exist, or be empty).")],
    bits: Annotated[int, typer.Option(help="8 (per-channel) or 4 (group-wise).")] = 4,
    group_size: Annotated[int, typer.Option(help="int4: inputs sharing a scale (32, 64, 128 or 256).")] = 128,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="int4: scales only, or scales and zero points.")] = False,
    search: Annotated[bool, typer.Option(help="Search each group's clipping range (slower, lower error).")] = False,
) -> None:
    """Write a copy of MODEL with its routed experts quantized (compressed-tensors pack-quantized)."""
    from offload.experts.quant import parse_scheme
    from offload.tools.quantize import quantize_checkpoint

    if bits not in (4, 8):
        raise ConfigError(f"--bits {bits} is not supported", "use 8 or 4")
    scheme = parse_scheme("int8" if bits == 8 else f"int4-g{group_size}-{'sym' if sym else 'asym'}")
    progress = Progress(TextColumn("quantizing experts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True, disable=not err.is_terminal)
    with progress:
        task = progress.add_task("quantizing", total=None)
        report = quantize_checkpoint(model, out, scheme, clip_search=search,
                                     progress=lambda d, t: progress.update(task, completed=d, total=t))
    err.print(f"wrote {report.out}: {report.experts} experts as {scheme}, {_gib(report.bytes_before)} -> "
              f"{_gib(report.bytes_after)}", soft_wrap=True)


@app.command()
def models() -> None:
    """List the models bundled with the package (usable by name, offline)."""
    from offload.checkpoint.locate import bundled_models

    names = bundled_models()
    if not names:
        err.print("no bundled models in this installation")
    for name in names:
        print(name)


app.command()(serve)
app.command()(chat)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
