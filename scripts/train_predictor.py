"""Train the ``learned`` routing-path predictor on routing traces and save it as safetensors.

    python scripts/train_predictor.py --trace scripts/results/traces/tiny-moe-stdlib-heldout.jsonl.gz \\
        --lookahead 2 --out tiny-moe-learned.safetensors

A trace may name some of its sequences, ``PATH@0-9,12``. Training is seeded full-batch AdamW over
every token (a seeded random --val-fraction of them held out to keep the best step), seconds to a
minute on 2 cores. The file's metadata holds the MoE shape, lookahead, hidden size, the training
config and report, the traces and the machine; load it with
``make_predictor("learned", shape, weights=PATH)`` (or ``offload run --predictor learned``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from common import atomic_path, err, machine_info, main, make_app, progress_bar
from rich.progress import TextColumn

from offload.traces.format import Trace
from predictors.evaluate import read_trace_spec
from predictors.learned import PathMLP, TrainConfig, TrainReport, report_dict, save_weights, train

app = make_app(__doc__.splitlines()[0])


def train_with_progress(traces: list[Trace], config: TrainConfig,
                        label: str = "training") -> tuple[PathMLP, TrainReport]:
    """Train with a rich progress bar on stderr (shared with eval_predictors.py)."""
    with progress_bar(TextColumn("loss {task.fields[loss]:.4f}")) as progress:
        task = progress.add_task(label, total=config.steps, loss=float("nan"))
        return train(traces, config, on_step=lambda step, loss: progress.update(task, completed=step, loss=loss))


@app.command()
def train_predictor(
    trace: Annotated[list[str], typer.Option(help="Routing trace, PATH or PATH@SEQS (0-9,12); repeat for several.")],
    out: Annotated[Path, typer.Option(help="Weights file to write (.safetensors).")],
    lookahead: Annotated[int, typer.Option(help="Predict layers l+1 .. l+LOOKAHEAD.")] = 2,
    hidden: Annotated[int, typer.Option(help="Hidden units of each (layer, lookahead) MLP.")] = TrainConfig.hidden,
    steps: Annotated[int, typer.Option(help="Full-batch optimiser steps.")] = TrainConfig.steps,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = TrainConfig.lr,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = TrainConfig.weight_decay,
    val_fraction: Annotated[float, typer.Option(help="Share of tokens held out to pick the best step.")]
    = TrainConfig.val_fraction,
    seed: Annotated[int, typer.Option(help="Seed of the init and the validation split.")] = TrainConfig.seed,
) -> None:
    """Fit the learned predictor's per-(layer, lookahead) MLPs with BCE and save them."""
    config = TrainConfig(lookahead, hidden, steps, lr, weight_decay, val_fraction, seed=seed)
    net, report = train_with_progress([read_trace_spec(s) for s in trace], config)
    extra = {**report_dict(report, config), "traces": trace, "machine": machine_info(), "torch": torch.__version__}
    with atomic_path(out) as tmp:
        save_weights(net, tmp, extra)
    err.print(f"wrote {out}: {report.params:,} parameters in {net.shape.num_layers} x {lookahead} MLPs, "
              f"{report.train_tokens} train / {report.val_tokens} val tokens, best step {report.best_step}, "
              f"{report.seconds:.1f} s")
    print(f"train loss {report.train_loss:.4f}  val loss {report.val_loss:.4f}")


if __name__ == "__main__":
    main(app)
