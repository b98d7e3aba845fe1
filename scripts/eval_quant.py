"""What quantizing the experts costs: perplexity of tiny-moe on held-out Python for every expert format.

The text is the standard library modules tiny-moe's training held out (its split: md5(seed:module) % 100
< 5), each encoded with the model's tokenizer (which starts a document with <|endoftext|>) and joined.
Every format is written by `offload quantize` (round to nearest, or with --search's clipping search) and
scored by `offload perplexity`'s code with the same windows, in each ``--quant-activations`` mode: int8 (the
default: offload's CPU kernels quantize activations per block to int8, what users run), int16 (the same kernels,
near exact) and float32 (dequantize and an exact float32 matmul: the format's own cost). Targets: each format
within +3% (int4) / +0.5% (int8) of the float32 model; int8 activations within +0.5% of float32 activations.

    python scripts/eval_quant.py --out scripts/results/eval_quant.json
"""

from __future__ import annotations

import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from common import machine_info, main, make_app, write_json, write_text
from train_tiny_moe import collect_sources, is_held_out  # a sibling script, as make_trace_prompts imports it

import offload
from offload.experts.kernels import linear
from offload.experts.quant import parse_scheme
from offload.tools.perplexity import perplexity
from offload.tools.quantize import quantize_checkpoint

app = make_app(__doc__.splitlines()[0], no_args_is_help=False)
SCHEMES = ("int8", "int4-g128-asym", "int4-g128-sym", "int4-g64-asym", "int4-g32-asym", "int4-g32-sym")
TARGETS = {"int8": 0.5, "int4": 3.0}  # % perplexity increase allowed (issue 12)
MODES = ("int8", "int16", "float32")  # --quant-activations
ACTIVATION_TARGET = 0.5  # % int8 activations may add over float32 activations (issue 22)


def held_out_ids(model, percent: int = 5, seed: int = 0, max_tokens: int = 0) -> list[int]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources, _ = collect_sources(stdlib, 300_000)
    ids: list[int] = []
    for src in sources:
        if is_held_out(src.module, percent, seed):
            ids += model.encode(src.text)[0].tolist()
    return ids[:max_tokens] if max_tokens else ids


def score(path: Path, ids: list[int], context: int, stride: int, activations: str) -> dict:
    # Score what decode computes: a window of `context` tokens would otherwise take the prefill path (dequantize +
    # torch's GEMM) in every mode; here every integer matmul runs in the kernels with the mode's activations.
    linear.INT_MAX_TOKENS = 1 << 30
    model = offload.from_pretrained(path, device="cpu", quant_activations=activations)
    t0 = time.perf_counter()
    result = perplexity(model, ids, context, stride)
    return {**result.to_dict(), "seconds": round(time.perf_counter() - t0, 2), "format": model.plan.expert_format.name,
            "expert_bytes": model.plan.expert_nbytes() * model.spec.total_experts}


def table(rows: list[dict]) -> str:
    lines = ["| experts | quantization | int8 activations | int16 | float32 (exact) | format vs float32 model "
             f"| int8 vs float32 activations (target <= +{ACTIVATION_TARGET}%) | expert MiB |",
             "|---|---|---|---|---|---|---|---|"]
    base = rows[0]["float32"]["perplexity"]
    for r in rows:
        ppl = {mode: r[mode]["perplexity"] for mode in MODES}
        target = next((f" (<= +{v}%)" for k, v in TARGETS.items() if r["scheme"].startswith(k)), "")
        lines.append(f"| {r['scheme']} | {r['method']} | {ppl['int8']:.3f} | {ppl['int16']:.3f} "
                     f"| {ppl['float32']:.3f} | {100 * (ppl['float32'] / base - 1):+.2f}%{target} "
                     f"| {100 * (ppl['int8'] / ppl['float32'] - 1):+.3f}% "
                     f"| {r['int8']['expert_bytes'] / 2**20:.2f} |")
    return "\n".join(lines)


@app.command()
def run(
    model: Annotated[str, typer.Option(help="A float checkpoint (bundled name or folder).")] = "tiny-moe",
    schemes: Annotated[str, typer.Option(help="Comma list of expert formats.")] = ",".join(SCHEMES),
    search: Annotated[bool, typer.Option(help="Also each int4 format with the clipping search.")] = True,
    context: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    stride: Annotated[int, typer.Option(help="Tokens each window moves on.")] = 256,
    max_tokens: Annotated[int, typer.Option(help="Score only the first N held-out tokens (0: all).")] = 0,
    out: Annotated[Path, typer.Option(help="JSON to write (a .md table beside it).")] = Path("eval_quant.json"),
) -> None:
    """Perplexity of each expert format on held-out text, against float32."""
    ids = held_out_ids(offload.from_pretrained(model, device="cpu"), max_tokens=max_tokens)
    base = score(offload.plan_checkpoint(model).path, ids, context, stride, "float32")
    rows = [{"scheme": "float32", "method": "none"} | dict.fromkeys(MODES, base)]  # float experts: one mode
    with tempfile.TemporaryDirectory() as tmp:
        for text in [s.strip() for s in schemes.split(",") if s.strip()]:
            for clip in (False, True) if search and text.startswith("int4") else (False,):
                path = Path(tmp) / f"{text}{'-search' if clip else ''}"
                quantize_checkpoint(model, path, parse_scheme(text), clip_search=clip)
                row = {"scheme": text, "method": "clip search" if clip else "round to nearest"}
                row |= {mode: score(path, ids, context, stride, mode) for mode in MODES}
                rows.append(row)
                print(f"{text} ({row['method']}): " + " / ".join(f"{row[m]['perplexity']:.3f}" for m in MODES),
                      flush=True)
    write_json(out, {"benchmark": "eval_quant", "machine": machine_info(), "model": model, "tokens": len(ids),
                     "params": {"context": context, "stride": stride, "max_tokens": max_tokens}, "rows": rows})
    write_text(out.with_suffix(".md"), table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main(app)
