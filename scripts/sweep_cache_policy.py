"""Sweep eviction policies and cache capacities over routing traces.

    python scripts/sweep_cache_policy.py --trace tests/data/mixtral-8x7b-humaneval.jsonl.gz --out out/sweep

Writes OUT/sweep.json (``{"schema": "offload-sweep/1", "records": [...], "params": ..., "machine": ...}``,
one record per trace x policy x scope x capacity), OUT/sweep.csv (the same records), OUT/sweep.png
(hit rate vs capacity) and prints the hit-rate tables in Markdown on stdout. Progress and errors go
to stderr; a bad trace or option is one line ``Error: ...`` and exit code 1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli.errors import one_line_errors
from offload.sim.simulate import AccessStream
from offload.hardware import machine_info
from offload.sim.sweep import (SweepConfig, markdown_tables, parse_capacities, plot_sweep, sweep,
                               to_json, write_csv)
from offload.traces.format import read_trace

err = Console(stderr=True)
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)


def run(traces: list[Path], config: SweepConfig, out: Path) -> str:
    """Read the traces, sweep them with a progress bar, write the files; returns the Markdown tables."""
    streams = {p.name: AccessStream.from_trace(read_trace(p)) for p in traces}
    out.mkdir(parents=True, exist_ok=True)
    records = []
    t0 = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("simulating", total=len(streams) * config.runs_per_trace())
        for name, stream in streams.items():
            for record in sweep(name, stream, config):
                records.append(record)
                progress.advance(task)
    params = {"traces": [str(p) for p in traces], "policies": list(config.policies),
              "per_layer": [c.text for c in config.per_layer], "global": [c.text for c in config.global_],
              "expert_bytes": config.expert_bytes, "bandwidth_gbps": config.bandwidth_gbps,
              "sweep_seconds": round(time.perf_counter() - t0, 3)}
    (out / "sweep.json").write_text(json.dumps(to_json(records, params=params, machine=machine_info()), indent=1))
    write_csv(records, out / "sweep.csv")
    plot_sweep(records, out / "sweep.png")
    err.print(f"wrote {out}/sweep.json, sweep.csv, sweep.png ({len(records)} runs)")
    return markdown_tables(records)


@app.command()
def main(
    trace: Annotated[list[Path], typer.Option(help="Routing trace (.jsonl.gz or .jsonl); repeat for several.")],
    out: Annotated[Path, typer.Option(help="Folder for sweep.json, sweep.csv and sweep.png.")],
    policies: Annotated[str, typer.Option(help="Comma-separated: lru, lfu, fifo, belady.")] = "lru,lfu,fifo,belady",
    per_layer: Annotated[str, typer.Option(help="Experts per layer: counts, ranges or shares (1-7, 2,4, 50%).")] = "1-7",
    global_: Annotated[str, typer.Option("--global", help="Global cache sizes: shares of all keys or counts.")]
    = "25%,50%,75%",
    expert_bytes: Annotated[Optional[int], typer.Option(help="Bytes of one expert: adds MB moved per token.")] = None,
    bandwidth: Annotated[Optional[float], typer.Option(help="GB/s host->device: adds transfer-bound ms/token.")]
    = None,
) -> None:
    """Hit rate of each eviction policy at each cache size, per-layer and global, on real routing traces."""
    with one_line_errors():
        config = SweepConfig(tuple(p.strip() for p in policies.split(",") if p.strip()),
                             parse_capacities(per_layer), parse_capacities(global_), expert_bytes, bandwidth)
        print(run(trace, config, out), end="")


if __name__ == "__main__":
    app()
