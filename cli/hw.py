"""`offload bench-hw` (measure this machine once) and `offload plan` (predict decode speed per budget and tier).

Thin, as the rest of cli/: the measurements are offload/hw/calibration.py's, the predictions offload/hw/perfmodel.py's.
The simulator and the trace reader are analysis code and load only inside `plan` (via perfmodel), so
importing the CLI never pulls them in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from offload.errors import ConfigError
from offload.files import write_json_atomic

from .options import Dtype, ModelArg

err = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `offload` app."""
    app.command("bench-hw")(bench_hw)
    app.command("plan")(plan)


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not a comma list of whole numbers", "e.g. 1,4,16,64") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{option} {text!r} needs whole numbers >= 1", "e.g. 1,4,16,64")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _shape(model: str | None, hidden: int, intermediate: int) -> tuple[int, int]:
    if model is None:
        if min(hidden, intermediate) < 16:
            raise ConfigError(f"--hidden {hidden} / --intermediate {intermediate} are too small", "use >= 16")
        return hidden, intermediate
    from offload.checkpoint.plan import plan_checkpoint

    spec = plan_checkpoint(model).spec
    return spec.hidden_size, spec.expert_intermediate_size


def bench_hw(
    out: Annotated[Path | None, typer.Option(help="Where to write the calibration (default: "
                                                  "$XDG_CACHE_HOME/offload/hardware.json or ~/.cache/...).")] = None,
    path: Annotated[Path | None, typer.Option(help="Folder for the temporary file the disk read is timed on "
                                                   "(removed after); put it on the checkpoints' disk.")] = None,
    model: Annotated[str | None, typer.Option(help="Time experts of this checkpoint's shape.")] = None,
    hidden: Annotated[int, typer.Option(help="Expert shape without --model: hidden size.")] = 1024,
    intermediate: Annotated[int, typer.Option(help="Expert shape without --model: intermediate size.")] = 3584,
    formats: Annotated[str, typer.Option(help="Expert formats to time: bfloat16, float32, int8, int4.")
                       ] = "bfloat16,float32,int8,int4",
    batches: Annotated[str, typer.Option(help="Tokens routed to the expert, comma list.")] = "1,4,16,64",
    threads: Annotated[int, typer.Option(help="torch threads while timing (0: torch's default, as the runtime "
                                              "uses).")] = 0,
    memory_mib: Annotated[int, typer.Option(help="Bytes per triad array and per H2D copy, MiB.")] = 128,
    disk_mib: Annotated[int, typer.Option(help="Size of the temporary file read back, MiB.")] = 256,
    gemv_mib: Annotated[int, typer.Option(help="Expert copies rotated per format (to stream from RAM), MiB.")] = 128,
    repeats: Annotated[int, typer.Option(help="Passes of each measurement.")] = 5,
    cuda: Annotated[bool, typer.Option("--cuda/--no-cuda", help="Measure the GPU too, when there is one.")] = True,
) -> None:
    """Measure host memory and disk bandwidth, CPU (and GPU) expert throughput, and PCIe: the cost and
    performance models' calibration, written to the user's cache directory."""
    import torch

    from offload.hw.calibration import default_path
    from offload.tools.benchhw import BenchSizes, calibrate

    if min(memory_mib, disk_mib, gemv_mib, repeats) < 1 or threads < 0:
        raise ConfigError("--memory-mib, --disk-mib, --gemv-mib and --repeats must be >= 1, --threads >= 0")
    shape = _shape(model, hidden, intermediate)
    token_counts, names = _ints(batches, "--batches"), _names(formats)
    if threads:
        torch.set_num_threads(threads)
    sizes = BenchSizes(memory_mib * 2**20, disk_mib * 2**20, gemv_mib * 2**20, repeats, repeats)
    with err.status("measuring") as status:
        calibration, notes = calibrate(*shape, path, names, token_counts, sizes,
                                       cuda=cuda and torch.cuda.is_available(),
                                       progress=lambda what: status.update(f"measuring {what}"))
    where = calibration.save(out or default_path())
    Console().print(_calibration_table(calibration))
    for note in notes:
        err.print(f"[yellow]note:[/yellow] {note}", soft_wrap=True)
    load = calibration.machine.get("loadavg", [0.0])[0]
    err.print(f"wrote {where} ({torch.get_num_threads()} torch threads, load average {load:.1f} on "
              f"{calibration.machine.get('cores')} cores: a busy machine measures low)", soft_wrap=True)


def _calibration_table(c) -> Table:
    """Bandwidths, then µs per expert of the measured shape per format and tokens (GB/s of weights at one)."""
    table = Table(title=f"calibration (expert {c.shape[0]} x {c.shape[1]}; * = default, not measured)")
    table.add_column("what")
    table.add_column("value", justify="right")

    def mark(name: str) -> str:
        return "" if name in c.measured else " *"

    mode = c.machine.get("disk_read_mode", "direct")
    rows = [("host memory bandwidth (triad)", c.host_memory_bandwidth, "host_memory_bandwidth"),
            ("host copy, one thread (bytes copied)", c.host_copy_bandwidth, "host_copy_bandwidth"),
            (f"disk read ({mode})", c.disk_read_bandwidth, "disk_read_bandwidth"),
            ("H2D, pinned", c.h2d_bandwidth, "h2d_bandwidth"), ("GPU memory", c.gpu_memory_bandwidth,
                                                              "gpu_memory_bandwidth")]
    for label, value, name in rows:
        table.add_row(label, f"{value / 1e9:.1f} GB/s{mark(name)}")
    table.add_row(f"disk request ({mode}, 4 KiB)", f"{c.disk_request_s * 1e6:.0f} µs{mark('disk_request_s')}")
    table.add_row("host round trip, one token", f"{c.roundtrip_latency_s * 1e6:.0f} µs{mark('roundtrip_latency_s')}")
    for side, name in (("CPU", "layer_overhead_s"), ("GPU", "gpu_layer_overhead_s")):
        table.add_row(f"runtime overhead per layer and token, {side}", f"{getattr(c, name) * 1e3:.2f} ms{mark(name)}")
    table.add_row("cache bookkeeping per miss", f"{c.miss_overhead_s * 1e3:.2f} ms{mark('miss_overhead_s')}")
    params = 3 * c.shape[0] * c.shape[1]
    bytes_per = {"float32": 4, "bfloat16": 2, "int8": 1, "int4": 0.5}
    for side, rates in (("CPU", c.cpu_gemv), ("GPU", c.gpu_gemv)):
        for fmt, by_tokens in rates.items():
            cells = ", ".join(f"{b}: {params / r * 1e6:.0f}" for b, r in sorted(by_tokens.items()))
            one = min(by_tokens)
            gbs = bytes_per.get(fmt, 2) * by_tokens[one] / 1e9
            table.add_row(f"{side} expert {fmt}, µs at tokens", f"{cells} ({gbs:.1f} GB/s of weights at {one})"
                          f"{mark(f'{side.lower()}_gemv.{fmt}')}")
    return table


def plan(
    model: ModelArg,
    trace: Annotated[Path | None, typer.Option(help="A routing trace of this model (offload trace) whose decode "
                                                    "tokens give the hit rates; without one, uniform routing.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto (cuda when there is one). Planning for cuda "
                                             "without one uses the calibration's GPU figures.")] = "auto",
    dtype: Dtype = "auto",
    expert_budget: Annotated[str, typer.Option(help='Budgets to predict, comma list: "100%,50%,25%", "16", '
                                                    '"6GiB".')] = "100%,50%,25%,10%",
    offload_to: Annotated[str, typer.Option(help="Tiers to predict: ram, disk, or ram,disk.")] = "ram,disk",
    calibration: Annotated[Path | None, typer.Option(help="A calibration file (default: the one `offload bench-hw` "
                                                          "wrote, else the defaults).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the predictions here.")] = None,
) -> None:
    """Predict decode tokens/s, bytes moved and stall time per token for each budget and tier (and hybrid on
    CUDA), and recommend a budget."""
    from offload.checkpoint.plan import plan_checkpoint
    from offload.hw import perfmodel
    from offload.hw.calibration import Calibration, default_path
    from offload.spec import parse_dtype
    from offload.tools.plan import fits_for, model_sizes, trace_miss_rate

    on = _plan_device(device)
    tiers, budgets = _names(offload_to), _names(expert_budget)
    if not tiers or set(tiers) - {"ram", "disk"}:
        raise ConfigError(f"--offload-to {offload_to!r}: give ram, disk or ram,disk")
    if not budgets:
        raise ConfigError("--expert-budget names no budget", 'e.g. "100%,50%,25%"')
    if calibration is not None and not calibration.is_file():
        raise ConfigError(f"--calibration {calibration} does not exist", "run `offload bench-hw --out FILE`")
    cal_path = calibration or default_path()
    cal = Calibration.load(cal_path)
    ckpt = plan_checkpoint(model)
    sizes = model_sizes(ckpt, on, parse_dtype(dtype))
    rate = trace_miss_rate(str(trace), sizes) if trace else perfmodel.uniform_miss_rate(sizes)
    compute = parse_dtype(dtype) or ckpt.spec.checkpoint_dtype
    predictions = perfmodel.predict(sizes, cal, on, tiers, budgets, rate, fits_for(ckpt, on, compute))
    best = perfmodel.recommend(predictions)
    Console().print(_plan_table(predictions, best))
    source = f"{cal_path} ({len(cal.measured)} figures measured)" if cal.measured else \
        "the defaults (run `offload bench-hw` to measure this machine)"
    hits = f"{trace} (decode tokens, global LRU)" if trace else "uniform routing (no --trace given)"
    err.print(f"calibration: {source}; hit rates: {hits}; the model ignores attention, Python overhead and "
              "overlap of loads with compute (offload/hw/perfmodel.py)", soft_wrap=True)
    if best is None:
        err.print("no configuration fits this machine's free memory", soft_wrap=True)
    else:
        hybrid = f" --hybrid {best.hybrid}" if on == "cuda" else ""
        err.print(f"recommended: --expert-budget {best.budget} --offload-to {best.tier}{hybrid} "
                  f"({best.tokens_per_s:.1f} tokens/s predicted)", soft_wrap=True)
    if json_out is not None:
        write_json_atomic(json_out, {"model": str(ckpt.path), "device": on, "trace": str(trace) if trace else None,
                                     "calibration": cal.to_json(), "predictions": [p.to_dict() for p in predictions],
                                     "recommended": best.to_dict() if best else None})


def _plan_device(device: str) -> str:
    import torch

    if device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"unknown device {device!r}", "use one of: cpu, cuda, auto")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _plan_table(predictions, best) -> Table:
    cuda = any(p.device == "cuda" for p in predictions)
    table = Table(title="predicted decode, batch 1 (* recommended)")
    heads = ["tier", "budget", "slots", *(["hybrid"] if cuda else []), "hit rate", "misses / token",
             *(["on CPU / token"] if cuda else []), "MiB moved / token", "stall ms / token", "tokens/s", "fits"]
    for h in heads:
        table.add_column(h, justify="left" if h in ("tier", "budget", "hybrid") else "right")
    for p in predictions:
        fits = {True: "yes", False: "no", None: "?"}[p.fits]
        row = [p.tier, p.budget + (" *" if p is best else ""), str(p.slots), *([p.hybrid] if cuda else []),
               f"{p.hit_rate:.1%}", f"{p.misses_per_token:.2f}", *([f"{p.cpu_experts_per_token:.2f}"] if cuda else []),
               f"{p.bytes_per_token / 2**20:.1f}", f"{p.stall_s_per_token * 1e3:.2f}", f"{p.tokens_per_s:.2f}", fits]
        table.add_row(*row)
    return table
