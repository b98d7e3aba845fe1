"""Sweep eviction policies and cache capacities over routing traces.

    python scripts/sweep_cache_policy.py --trace tests/data/mixtral-8x7b-humaneval.jsonl.gz --out out/sweep

Writes OUT/sweep.json (``{"schema": "offload-sweep/1", "records": [...], "params": ..., "machine": ...}``,
one record per trace x policy x scope x capacity), OUT/sweep.csv (the same records), OUT/sweep.png
(hit rate vs capacity) and prints the hit-rate tables in Markdown on stdout. Progress and errors go
to stderr; a bad trace or option is one line ``Error: ...`` and exit code 1.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from common import atomic_path, err, machine_info, main, make_app, progress_bar, write_json

from offload.amounts import Amount
from offload.errors import ConfigError
from offload.sim.simulate import AccessStream
from offload.sim.sweep import SweepConfig, markdown_tables, parse_capacities, plot_sweep, sweep, to_json, write_csv
from offload.traces.format import read_trace

app = make_app(__doc__.splitlines()[0])


def run(traces: list[Path], config: SweepConfig, out: Path) -> str:
    """Read the traces, sweep them with a progress bar, write the files; returns the Markdown tables."""
    streams = {p.name: AccessStream.from_trace(read_trace(p)) for p in traces}
    records = []
    t0 = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("simulating", total=len(streams) * config.runs_per_trace())
        for name, stream in streams.items():
            for record in sweep(name, stream, config):
                records.append(record)
                progress.advance(task)
    params = {"traces": [str(p) for p in traces], "policies": list(config.policies),
              "per_layer": [c.text for c in config.per_layer], "global": [c.text for c in config.global_],
              "expert_bytes": config.expert_bytes, "bandwidth_gbps": config.bandwidth_gbps,
              "sweep_seconds": round(time.perf_counter() - t0, 3)}
    write_json(out / "sweep.json", to_json(records, params=params, machine=machine_info()))
    with atomic_path(out / "sweep.csv") as tmp:
        write_csv(records, tmp)
    with atomic_path(out / "sweep.png") as tmp:
        plot_sweep(records, tmp)
    err.print(f"wrote {out}/sweep.json, sweep.csv, sweep.png ({len(records)} runs)")
    return markdown_tables(records)


def expert_nbytes(text: str | None) -> int | None:
    """``--expert-bytes``: a byte count (352321536) or a size (336MiB, 352MB)."""
    if text is None:
        return None
    amount = Amount.parse(text, "--expert-bytes", "give bytes (352321536) or a size (336MiB)")
    if amount.kind == "share":
        raise ConfigError(f"--expert-bytes {text!r} is a share", "give bytes (352321536) or a size (336MiB)")
    return int(amount.value)


def bandwidth_gbps(text: str | None) -> float | None:
    """``--bandwidth``: GB/s as a number (25) or a size per second (25GB/s, 24GiB/s)."""
    if text is None:
        return None
    clean = text.strip().removesuffix("/s")
    try:
        return float(clean)
    except ValueError:
        pass
    amount = Amount.parse(clean, "--bandwidth", "give GB/s (25) or a size per second (25GB/s)")
    if amount.kind != "bytes":
        raise ConfigError(f"cannot parse --bandwidth {text!r}", "give GB/s (25) or a size per second (25GB/s)")
    return amount.value / 1e9


@app.command()
def sweep_policies(
    trace: Annotated[list[Path], typer.Option(help="Routing trace (.jsonl.gz or .jsonl); repeat for several.")],
    out: Annotated[Path, typer.Option(help="Folder for sweep.json, sweep.csv and sweep.png.")],
    policies: Annotated[str, typer.Option(help="Comma-separated: lru, lfu, fifo, belady.")] = "lru,lfu,fifo,belady",
    per_layer: Annotated[str, typer.Option(help="Experts per layer: counts, ranges or shares (1-7, 2,4, 50%).")]
    = "1-7",
    global_: Annotated[str, typer.Option("--global", help="Global cache sizes: shares of all keys or counts.")]
    = "25%,50%,75%",
    expert_bytes: Annotated[str | None, typer.Option(help="Bytes of one expert (or a size: 336MiB): adds MB moved "
                                                           "per token.")] = None,
    bandwidth: Annotated[str | None, typer.Option(help="Host->device GB/s (25, or 25GB/s): adds transfer-bound "
                                                        "ms/token.")] = None,
) -> None:
    """Hit rate of each eviction policy at each cache size, per-layer and global, on real routing traces."""
    config = SweepConfig(tuple(p.strip() for p in policies.split(",") if p.strip()), parse_capacities(per_layer),
                         parse_capacities(global_), expert_nbytes(expert_bytes), bandwidth_gbps(bandwidth))
    print(run(trace, config, out), end="")


if __name__ == "__main__":
    main(app)
