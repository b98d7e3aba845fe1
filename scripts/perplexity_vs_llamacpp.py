"""Perplexity of the same GGUF files through offload and through llama.cpp, on the same token ids (issue 25: within 1%).

Each file is scored by both engines over the same windows (offload/tools/perplexity.py's: ``--context`` tokens moved
``--stride`` at a time, each token scored once): llama.cpp tokenizes the text (with its BOS) and scores it with its
logits for every position (llama-cpp-python, in scripts/llamacpp_worker.py, which never imports torch); offload
scores the same ids with its runtime on the file (its default: experts computed from the blocks with int8
activations; ``--dtype`` the compute dtype, float32 by default as llama.cpp's activations are). Each engine runs in
its own process, one after the other, on ``--threads`` threads.

    python scripts/perplexity_vs_llamacpp.py /tmp/offload-bench/gguf/*-q8_0.gguf /tmp/offload-bench/gguf/*-q4_k_m.gguf
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Annotated

import typer
from common import machine_info, main, make_app, write_results

TARGET = 0.01  # issue 25: the two engines' perplexities within 1% of each other
CORPUS = ("textwrap.py", "difflib.py")  # stdlib text, the same on every machine with this Python

app = make_app(__doc__.splitlines()[0])


def default_text(chars: int = 40_000) -> str:
    """The first ``chars`` characters of a few standard-library sources (code and English prose in docstrings)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "".join((lib / name).read_text() for name in CORPUS)[:chars]


def run_worker(cmd: list[str], what: str) -> dict:
    """One engine's process; its last stdout line as JSON, or a one-line error with its stderr's end."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise typer.BadParameter(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def offload_worker(task: dict) -> dict:
    """Score ``task["ids"]`` with offload's runtime on the GGUF (runs in this script's --worker process)."""
    import torch

    import offload
    from offload.tools.perplexity import perplexity

    torch.set_num_threads(task["threads"])
    model = offload.from_pretrained(task["gguf"], device="cpu", dtype=task["dtype"], threads=task["threads"],
                                    quant_activations=task["activations"])
    t0 = time.perf_counter()
    result = perplexity(model, task["ids"], task["context"], task["stride"])
    return result.to_dict() | {"seconds": time.perf_counter() - t0, "expert_format": model.plan.expert_format.name}


def compare(path: Path, text: str, tokens: int, context: int, stride: int, threads: int, dtype: str,
            activations: str) -> dict:
    """Both engines' perplexity of ``path`` on the same ids: llama.cpp tokenizes, then scores; offload scores."""
    from offload.tools.perplexity import windows

    here = Path(__file__)
    task = {"task": "tokenize", "weights": str(path), "text": text, "threads": threads}
    ids = run_worker([sys.executable, str(here.with_name("llamacpp_worker.py")), json.dumps(task)],
                     f"llama.cpp tokenizing with {path.name}")["ids"][:tokens]
    spans = windows(len(ids), context, stride)
    task = {"task": "perplexity", "weights": str(path), "ids": ids, "spans": spans, "context": context,
            "threads": threads}
    theirs = run_worker([sys.executable, str(here.with_name("llamacpp_worker.py")), json.dumps(task)],
                        f"llama.cpp scoring {path.name}")
    task = {"gguf": str(path), "ids": ids, "context": context, "stride": stride, "threads": threads, "dtype": dtype,
            "activations": activations}
    ours = run_worker([sys.executable, str(here), "--worker", json.dumps(task)], f"offload scoring {path.name}")
    gap = ours["perplexity"] / theirs["perplexity"] - 1
    return {"gguf": str(path), "tokens": len(ids), "offload": ours, "llama.cpp": theirs, "relative_gap": gap,
            "within_target": abs(gap) <= TARGET}


def table(rows: list[dict]) -> str:
    lines = ["| GGUF | scored tokens | offload perplexity | llama.cpp perplexity | offload / llama.cpp - 1 | target |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "met" if r["within_target"] else "missed"
        lines.append(f"| {Path(r['gguf']).name} ({r['offload']['expert_format']}) | {r['offload']['tokens']} | "
                     f"{r['offload']['perplexity']:.4g} | {r['llama.cpp']['perplexity']:.4g} | "
                     f"{100 * r['relative_gap']:+.2f}% | within {100 * TARGET:.0f}%: {verdict} |")
    return "\n".join(lines) + "\n"


@app.command()
def run(
    ggufs: Annotated[list[Path] | None, typer.Argument(help="GGUF files to score (each by both engines).")] = None,
    text_file: Annotated[Path | None, typer.Option("--text", help="Text to score (default: stdlib sources).")] = None,
    tokens: Annotated[int, typer.Option(help="Score at most this many tokens of the text.")] = 2048,
    context: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    stride: Annotated[int, typer.Option(help="Tokens a window moves (= context: no overlap).")] = 512,
    threads: Annotated[int, typer.Option(help="Threads of each engine.")] = 2,
    dtype: Annotated[str, typer.Option(help="offload's compute dtype.")] = "float32",
    quant_activations: Annotated[str, typer.Option(help="offload's --quant-activations (int8: the block kernels, "
                                                        "float32: exact dequantized experts).")] = "int8",
    worker: Annotated[str | None, typer.Option(hidden=True, help="Internal: one offload scoring task.")] = None,
    out: Annotated[Path, typer.Option(help="JSON to write (and a .md table beside it).")] = Path(
        "scripts/results/perplexity_vs_llamacpp.json"),
) -> None:
    if worker:
        print(json.dumps(offload_worker(json.loads(worker))))
        return
    if not ggufs:
        raise typer.BadParameter("give at least one GGUF file")
    missing = [str(p) for p in ggufs if not p.is_file()]
    if missing:
        raise typer.BadParameter(f"no such GGUF file: {', '.join(missing)}")
    text = text_file.read_text() if text_file else default_text()
    before = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "loadavg": os.getloadavg()}
    rows = []
    for path in ggufs:
        rows.append(compare(path, text, tokens, context, stride, threads, dtype, quant_activations))
        print(f"  {path.name}: offload {rows[-1]['offload']['perplexity']:.4g}, llama.cpp "
              f"{rows[-1]['llama.cpp']['perplexity']:.4g}", file=sys.stderr)
    params = {"ggufs": [str(p) for p in ggufs], "text": str(text_file) if text_file else f"stdlib {CORPUS}",
              "tokens": tokens, "context": context, "stride": stride, "threads": threads, "dtype": dtype,
              "quant_activations": quant_activations}
    write_results(out, {"machine": machine_info("llama_cpp_python", "gguf"), "load_before": before,
                        "load_after": os.getloadavg(), "params": params, "results": rows}, table(rows))


if __name__ == "__main__":
    main(app)
