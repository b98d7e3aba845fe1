"""Decode tok/s with the fused MoE layer call (offload/experts/kernels/moe.py) against the unfused one, same process.

The unfused path is the forward's per-expert loop (gather, gate/up kernel, torch's activation, down kernel, weighted
scatter), taken by making ``moe.applies`` say no; nothing else changes. Random bf16 models made with transformers:
``top8``, Qwen3-MoE-shaped (hidden 1024, 64 experts of width 384, top-8, 6 layers: 48 experts a token, where the
per-expert Python of the unfused path adds up) and ``top2``, Mixtral-shaped (hidden 1024, 8 experts of width 3584,
top-2, 4 layers). Fully resident, 2 threads, greedy; the two paths alternate run by run (ABAB, then BABA), each run's
figure is its median time per decode token, the result the median over runs with the range.

    python scripts/bench_moe_layer.py --out scripts/results/bench_moe_layer.json
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer
from common import machine_info, main, make_app, write_results
from timing import TokenClock

import offload
from offload.experts.kernels import moe

MODELS = {
    "top8": ("Qwen3MoeConfig", dict(hidden_size=1024, num_hidden_layers=6, num_attention_heads=16,
                                    num_key_value_heads=4, head_dim=64, intermediate_size=2048,
                                    moe_intermediate_size=384, num_experts=64, num_experts_per_tok=8,
                                    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
    "top2": ("MixtralConfig", dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                                   intermediate_size=3584, num_local_experts=8, num_experts_per_tok=2)),
}

app = make_app(__doc__.split("\n\n")[0], no_args_is_help=False)


def make_model(name: str, root: Path) -> Path:
    import transformers

    out = root / name
    if not (out / "config.json").exists():
        cls, kwargs = MODELS[name]
        config = getattr(transformers, cls)(vocab_size=32000, max_position_embeddings=4096, initializer_range=0.02,
                                            tie_word_embeddings=False, **kwargs)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(out)
    return out


def decode_ms(model, ids: torch.Tensor, tokens: int) -> tuple[float, list[int]]:
    clock = TokenClock()
    model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=[], streamer=clock)
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    return statistics.median(gaps) * 1e3, clock.tokens


@app.command()
def run(out: Annotated[Path, typer.Option(help="JSON results (a .md table beside it).")] = Path(
            "scripts/results/bench_moe_layer.json"),
        models: Annotated[str, typer.Option(help="Comma-separated: " + ", ".join(MODELS))] = "top8,top2",
        rounds: Annotated[int, typer.Option(help="Runs of each path, alternating.")] = 8,
        tokens: Annotated[int, typer.Option(help="New tokens per run.")] = 64,
        work: Annotated[Path | None, typer.Option(help="Folder for the random models (default: a temporary one).")]
        = None) -> None:
    """Run the comparison and write JSON plus a Markdown table."""
    root = work or Path(tempfile.mkdtemp(prefix="bench-moe-layer-"))
    applies = moe.applies
    results, rows = {}, []
    for name in models.split(","):
        model = offload.from_pretrained(make_model(name, root), device="cpu", dtype="bfloat16", predictor="none",
                                        offload_to="ram", expert_budget="100%", threads=2)
        ids = torch.tensor([[1] + list(range(100, 131))])
        samples: dict[str, list[float]] = {"fused": [], "unfused": []}
        generated = {}
        for r in range(rounds):
            for path in ("fused", "unfused") if r % 2 == 0 else ("unfused", "fused"):
                moe.applies = applies if path == "fused" else (lambda *args: False)
                ms, generated[path] = decode_ms(model, ids, tokens)
                samples[path].append(ms)
        moe.applies = applies
        med = {p: statistics.median(v) for p, v in samples.items()}
        results[name] = {"samples_ms_per_token": samples, "median_ms_per_token": med,
                         "speedup": med["unfused"] / med["fused"],
                         "same_tokens": generated["fused"] == generated["unfused"],
                         "experts_per_token": model.spec.top_k * len(model.model.moe_layers)}
        rows.append(f"| {name} | {results[name]['experts_per_token']} | "
                    + " | ".join(f"{med[p]:.2f} [{min(samples[p]):.2f}-{max(samples[p]):.2f}]" for p in samples)
                    + f" | **{results[name]['speedup']:.2f}x** | {results[name]['same_tokens']} |")
        model.close()
    record = {"machine": machine_info(), "parameters": {"models": {m: MODELS[m] for m in models.split(",")},
                                                       "rounds": rounds, "tokens": tokens, "threads": 2},
              "results": results}
    header = "| model | experts a token | fused ms/token | unfused ms/token | unfused / fused | same tokens |"
    table = "\n".join([header, "|---|---|---|---|---|---|", *rows]) + "\n"
    write_results(out, record, table)


if __name__ == "__main__":
    main(app)
