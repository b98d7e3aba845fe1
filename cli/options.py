"""Options several commands share (run, trace, perplexity, ...): spelled once, so every command
offers the same runtime knobs with the same help, and builds its RuntimeConfig the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from offload.config import RuntimeConfig
from offload.errors import ConfigError

ModelArg = Annotated[str, typer.Argument(help="Checkpoint folder, hub repo id (org/name) or bundled model name.")]
Device = Annotated[str, typer.Option(help="cpu, cuda or auto.")]
Dtype = Annotated[str, typer.Option(help="Compute dtype: auto (the checkpoint's), float32, bfloat16, float16.")]
ExpertBudget = Annotated[str, typer.Option(
    help='Expert cache size: auto (the most that fits this machine), slots ("16"), share ("25%") or bytes ("6GiB").')]
OffloadTo = Annotated[str, typer.Option(help="Where uncached experts live: disk or ram.")]
Policy = Annotated[str, typer.Option(help="Eviction policy: lru, lfu, fifo, layer-lru, predictive or layer-budget.")]
Predictor = Annotated[str, typer.Option(help="Prefetch with: none, pregate, prev-token, markov or learned.")]
Lookahead = Annotated[int, typer.Option(help="MoE layers the predictor looks ahead.")]
PrefetchBudget = Annotated[str, typer.Option(
    help='Most cache slots prefetched experts may hold before use: "4" or "50%".')]
Context = Annotated[int, typer.Option(
    help="Tokens per sequence (prompt + reply) the KV cache holds; 0: the model's max positions, at most 4096.")]
Temperature = Annotated[float, typer.Option(help="0 = greedy; > 0 samples.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass (with --temperature > 0).")]
Seed = Annotated[int | None, typer.Option(help="Seed for sampling.")]
PredictorFile = Annotated[Path | None, typer.Option(
    help="learned: its weights (scripts/train_predictor.py); markov: a routing trace to fit its counts.")]


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
                   predictor_file: Path | None = None, **batching) -> RuntimeConfig:
    """The RuntimeConfig of a command's shared options (validated here, before any file is read)."""
    return RuntimeConfig(device=device, dtype=dtype, expert_budget=expert_budget, offload_to=offload_to, policy=policy,
                         predictor=predictor, lookahead=lookahead, prefetch_budget=prefetch_budget,
                         predictor_options=predictor_options(predictor, predictor_file), **batching)
