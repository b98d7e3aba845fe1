"""`offload profile` (measure task expert patterns) and the patterns part of `offload info`.

Thin, as the rest of cli/: the measurement is offload/tools/profile.py's, the format and the coverage
offload/memory/patterns.py's. The profiler reads traces, analysis code, so it loads only inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from offload.errors import ConfigError
from offload.memory.patterns import COVERAGE, DEFAULT_THRESHOLD, Patterns

from .load import load_model
from .options import LOADING, ModelArg, RuntimeOptions, with_runtime_options

err = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `offload` app."""
    app.command("profile")(profile)


@with_runtime_options(LOADING)
def profile(
    model: ModelArg,
    runtime: RuntimeOptions,
    out: Annotated[Path, typer.Option(help="Patterns file to write (JSON, offload-expert-patterns/1).")],
    task: Annotated[list[str] | None, typer.Option(
        help="NAME=FILE: a task's text, run through the model (prompts .jsonl: each prompt; any other file: all "
             "of it). Repeat for more tasks or files.")] = None,
    trace: Annotated[list[str] | None, typer.Option(
        help="NAME=FILE: a task's routing trace (`offload trace`), read instead of running the model.")] = None,
    threshold: Annotated[float, typer.Option(
        help="TCESS threshold r: a selection counts only if its top-k-renormalised weight is >= r.")
    ] = DEFAULT_THRESHOLD,
    context: Annotated[int, typer.Option(help="Tokens per forward when a long text is run through the model.")] = 512,
) -> None:
    """Measure which experts each task needs (PreMoe's TCESS per layer and expert) and write a patterns file for
    --patterns (warm start, --prune) and `offload info --patterns`."""
    from offload.tools.profile import model_identity, parse_sources
    from offload.tools.profile import profile as measure

    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory", "give a file path such as patterns.json")
    tasks, traces = parse_sources(task or [], "--task"), parse_sources(trace or [], "--trace")
    m = load_model(model, runtime.config()) if tasks else None
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True, disable=not err.is_terminal)
    bars: dict[str, int] = {}

    def report(name: str, done: int, total: int) -> None:
        if name not in bars:
            bars[name] = progress.add_task(f"profiling {name}", total=total)
        progress.update(bars[name], completed=done)

    with progress:
        patterns = measure(m, tasks, traces, threshold, context, report, None if m else model_identity(model))
    patterns.save(out)
    sizes = ", ".join(f"{name} {t.tokens} tokens" for name, t in patterns.tasks.items())
    err.print(f"wrote {out}: {sizes} ({patterns.model.describe()})", soft_wrap=True, highlight=False)


def coverage_table(patterns: Patterns) -> Table:
    """Per task and MoE layer, the experts that hold 50 / 80 / 95% of the routing mass (TCESS)."""
    table = Table(title="experts per layer holding the routing mass (TCESS) of each task")
    for column in ("task", "tokens", "MoE layer", *(f"{c:.0%}" for c in COVERAGE)):
        table.add_column(column, justify="left" if column == "task" else "right")
    for name, t in patterns.tasks.items():
        counts = [t.coverage(c) for c in COVERAGE]
        for m, layer in enumerate(patterns.model.moe_layers):
            table.add_row(name if m == 0 else "", str(t.tokens) if m == 0 else "", str(layer),
                          *(str(int(c[m])) for c in counts))
    return table


def prune_hint(patterns: Patterns, mass: float = 0.8) -> str:
    """The --prune that keeps ``mass`` of every layer's routing mass, per task."""
    n = patterns.model.num_experts
    return "; ".join(f"{name}: --prune {int(t.coverage(mass).max())} ({int(t.coverage(mass).max()) / n:.0%})"
                     for name, t in patterns.tasks.items())
