"""Loading a model for a command: from_pretrained with a progress bar on stderr, and the auto budget's choice said."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

err = Console(stderr=True)


def _progress_bar() -> tuple[Progress, Callable[[str, int, int], None]]:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True, disable=not err.is_terminal)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(f"loading {stage}", total=total)
        progress.update(tasks[stage], completed=done)

    return progress, update


def load_model(model: str, runtime):
    """from_pretrained with the loading progress bar on stderr; an auto budget's choice is printed."""
    import offload
    from offload.memory.budget import is_auto

    progress, update = _progress_bar()
    with progress:
        m = offload.from_pretrained(model, runtime, progress=update)
    if is_auto(runtime.expert_budget):
        err.print(f"[dim]expert budget auto: {m.cache.num_slots} of {m.spec.total_experts} experts fit this "
                  "machine[/dim]", soft_wrap=True)
    return m
