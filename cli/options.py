"""Options several commands share (run, trace, perplexity, ...): spelled once, so every command
offers the same runtime knobs with the same help, and builds its RuntimeConfig the same way."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from offload.errors import ConfigError

if TYPE_CHECKING:
    from offload.runtime.config import RuntimeConfig

ModelArg = Annotated[str, typer.Argument(help="Checkpoint folder, hub repo id (org/name) or bundled model name.")]
PANEL = "Runtime"  # --help lists the shared runtime options together, after each command's own
Device = Annotated[str, typer.Option(help="cpu, cuda or auto.", rich_help_panel=PANEL)]
Dtype = Annotated[str, typer.Option(
    help="Compute dtype: auto (the checkpoint's), float32, bfloat16, float16.", rich_help_panel=PANEL)]
ExpertBudget = Annotated[str, typer.Option(
    help='Expert cache size: auto (the most that fits this machine), slots ("16"), share ("25%") or bytes ("6GiB").',
    rich_help_panel=PANEL)]
OffloadTo = Annotated[str, typer.Option(help="Where uncached experts live: disk or ram.", rich_help_panel=PANEL)]
Policy = Annotated[str, typer.Option(
    help="Eviction policy: lru, lfu, fifo, layer-lru, predictive or layer-budget.", rich_help_panel=PANEL)]
Predictor = Annotated[str, typer.Option(
    help="Prefetch with: none, pregate, prev-token, markov or learned.", rich_help_panel=PANEL)]
Lookahead = Annotated[int, typer.Option(help="MoE layers the predictor looks ahead.", rich_help_panel=PANEL)]
PrefetchBudget = Annotated[str, typer.Option(
    help='Most cache slots prefetched experts may hold before use: "4" or "50%".', rich_help_panel=PANEL)]
Context = Annotated[int, typer.Option(
    help="Tokens per sequence (prompt + reply) the KV cache holds; 0: the model's max positions, at most 4096.")]
Temperature = Annotated[float, typer.Option(help="0 = greedy; > 0 samples.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass (with --temperature > 0).")]
Seed = Annotated[int | None, typer.Option(help="Seed for sampling.")]
Hybrid = Annotated[str, typer.Option(
    help="Applies with --device cuda: per missed expert, off (fetch it to the GPU), auto (fetch or compute it on the "
         "CPU from its host copy, whichever the cost model calibrated by `offload bench-hw` says is faster) or "
         "always (the CPU whenever its host copy can compute it).", rich_help_panel=PANEL)]
PatternsFile = Annotated[Path | None, typer.Option(
    "--patterns", help="Task expert patterns (`offload profile`): each request's prompt is matched to a task whose "
                       "experts warm the cache before decode (lossless).", rich_help_panel=PANEL)]
Task = Annotated[str | None, typer.Option(
    help="With --patterns: use this task's pattern instead of matching each prompt.", rich_help_panel=PANEL)]
Prune = Annotated[str | None, typer.Option(
    help='With --patterns: keep only this many experts per layer ("4", "50%", "0.5") of --task (else the generic '
         "pattern) and route among them; they load once and the slow tier is never read again (lossy: check "
         "`offload perplexity` with it).", rich_help_panel=PANEL)]
QuantActivations = Annotated[str, typer.Option(
    help="Integer experts on the CPU: int8 (activations quantized per block, llama.cpp's choice), int16 (near "
         "exact) or float32 (dequantize, exact float32 matmuls).", rich_help_panel=PANEL)]
Threads = Annotated[int, typer.Option(
    help="Compute threads (offload's kernels and torch's); 0: the physical cores.", rich_help_panel=PANEL)]
PredictorFile = Annotated[Path | None, typer.Option(
    help="learned: its weights (scripts/train_predictor.py); markov: a routing trace to fit its counts.",
    rich_help_panel=PANEL)]

SHARED: dict[str, tuple[Any, Any]] = {  # option -> (annotation, default)
    "device": (Device, "auto"), "dtype": (Dtype, "auto"), "expert_budget": (ExpertBudget, "auto"),
    "offload_to": (OffloadTo, "disk"), "policy": (Policy, "lru"), "predictor": (Predictor, "none"),
    "lookahead": (Lookahead, 1), "prefetch_budget": (PrefetchBudget, "50%"),
    "predictor_file": (PredictorFile, None), "hybrid": (Hybrid, "off"),
    "patterns": (PatternsFile, None), "task": (Task, None), "prune": (Prune, None),
    "quant_activations": (QuantActivations, "int8"), "threads": (Threads, 0),
}
LOADING = ("device", "dtype", "expert_budget", "offload_to", "policy", "quant_activations", "threads")
PATTERNS = ("patterns", "task", "prune")
ALL = tuple(SHARED)


@dataclass(frozen=True)
class RuntimeOptions:
    """The shared runtime options a command was given (by :func:`with_runtime_options`)."""

    values: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def config(self, **more: Any) -> RuntimeConfig:
        """The RuntimeConfig of these options and a command's own fields (batching, context)."""
        return runtime_config(**self.values, **more)


def with_runtime_options(names: tuple[str, ...] = ALL, **defaults: Any) -> Callable:
    """Give a Typer command the shared options ``names`` (defaults overridable), handed to it as one
    ``runtime: RuntimeOptions`` argument: every command spells them, and builds its config, the same way."""
    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "runtime"]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=SHARED[n][0],
                                   default=defaults.get(n, SHARED[n][1])) for n in names]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return command(*args, runtime=RuntimeOptions({n: kwargs.pop(n) for n in names}), **kwargs)

        wrapper.__signature__ = inspect.Signature(own + added, return_annotation=None)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper
    return decorate


def predictor_options(predictor: str, path: Path | None) -> dict | None:
    """--predictor-file is the learned predictor's weights or the trace markov fits its counts on."""
    if path is None:
        return None
    if not path.is_file():
        raise ConfigError(f"--predictor-file {path} does not exist",
                          "give a .safetensors (learned) or a trace (markov)")
    if predictor == "learned":
        return {"weights": path}
    if predictor == "markov":
        return {"trace": path}
    raise ConfigError(f"--predictor {predictor} takes no --predictor-file", "use it with learned or markov")


def runtime_config(device: str = "auto", dtype: str = "auto", expert_budget: str = "100%", offload_to: str = "disk",
                   policy: str = "lru", predictor: str = "none", lookahead: int = 1, prefetch_budget: str = "50%",
                   predictor_file: Path | None = None, hybrid: str = "off", patterns: Path | None = None,
                   task: str | None = None, prune: str | None = None, quant_activations: str = "int8",
                   threads: int = 0, **batching) -> RuntimeConfig:
    """The RuntimeConfig of a command's shared options (validated here, before any file is read)."""
    from offload.runtime.config import RuntimeConfig  # torch and the registries: not for --help

    return RuntimeConfig(device=device, dtype=dtype, expert_budget=expert_budget, offload_to=offload_to, policy=policy,
                         predictor=predictor, lookahead=lookahead, prefetch_budget=prefetch_budget,
                         predictor_options=predictor_options(predictor, predictor_file), hybrid=hybrid,
                         patterns=patterns, task=task, prune=prune, quant_activations=quant_activations,
                         threads=threads, **batching)
