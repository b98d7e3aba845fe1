"""Decode speed of a Gated DeltaNet hybrid (Qwen3.5-MoE) beside a KV-cached model of the same sizes (Qwen3-MoE).

For each family, a random model of the given sizes is made with transformers (as tests/tiny_models.py does, at a
size of your choosing), loaded with every expert resident in RAM, prefilled with a prompt of --prompt-len tokens
and decoded --new-tokens tokens one step at a time. Each layer's attention call is timed, so the JSON says what a
linear-attention layer costs per token beside a KV-cached attention layer at that context, next to what each
costs by construction (weight bytes, state or KV bytes read, FLOPs). Runs alternate between the families;
medians of --repeats. Needs transformers (pip install offload[bench]) to make the models.

    python scripts/bench_families.py --hidden 512 --layers 8 --experts 16 --prompt-len 256 \
        --out scripts/results/bench_families.json
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
from common import err, machine_info, main, make_app, write_json

import offload
from offload.memory.budget import sequence_nbytes
from offload.model.kv import KVCache

app = make_app(__doc__.splitlines()[0], no_args_is_help=False)  # bare: the benchmark at its default scale
FAMILIES = ("qwen3_moe", "qwen3_5_moe")


@dataclass(frozen=True)
class Options:
    """Every option of the run, as given (recorded as the JSON's params)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    expert_intermediate: int
    linear_key_heads: int
    linear_value_heads: int
    linear_head_dim: int
    vocab: int
    prompt_len: int
    new_tokens: int
    repeats: int
    threads: int
    dtype: str
    work_dir: Path
    out: Path


def family_config(family: str, o: Options):
    """A transformers config of ``family`` at the run's sizes (the same attention and MoE sizes for both)."""
    import transformers

    common = dict(vocab_size=o.vocab, hidden_size=o.hidden, num_hidden_layers=o.layers, num_attention_heads=o.heads,
                  num_key_value_heads=o.kv_heads, head_dim=o.head_dim, num_experts=o.experts,
                  num_experts_per_tok=o.top_k, moe_intermediate_size=o.expert_intermediate, initializer_range=0.02,
                  max_position_embeddings=max(4096, o.prompt_len + o.new_tokens), bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, tie_word_embeddings=False)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, intermediate_size=4 * o.hidden, norm_topk_prob=True)
    return transformers.Qwen3_5MoeTextConfig(**common, shared_expert_intermediate_size=o.expert_intermediate,
                                             linear_num_key_heads=o.linear_key_heads,
                                             linear_num_value_heads=o.linear_value_heads,
                                             linear_key_head_dim=o.linear_head_dim,
                                             linear_value_head_dim=o.linear_head_dim, linear_conv_kernel_dim=4)


def build(family: str, o: Options) -> Path:
    """The random model of ``family`` in --work-dir (made once, kept for later runs)."""
    import transformers

    out = o.work_dir / f"{family}-h{o.hidden}-l{o.layers}-e{o.experts}"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(family_config(family, o)).to(getattr(torch, o.dtype))
        model.save_pretrained(out)
    return out


class Timed:
    """A layer's attention piece with its calls timed (seconds added to ``spent[name]`` while ``on``)."""

    def __init__(self, piece, spent: dict[str, float], switch: list[bool]) -> None:
        self.piece, self.spent, self.switch = piece, spent, switch
        self.name = type(piece).name

    def __call__(self, *args):
        start = time.perf_counter()
        out = self.piece(*args)
        if self.switch[0]:
            self.spent[self.name] = self.spent.get(self.name, 0.0) + time.perf_counter() - start
        return out


def run_one(path: Path, o: Options) -> dict:
    """Prefill, then decode token by token: ms per token, and each attention piece's ms per layer per token."""
    model = offload.from_pretrained(path, device="cpu", expert_budget="100%", offload_to="ram").model
    spent: dict[str, float] = {}
    switch = [False]
    pieces = [type(lw.attention).name for lw in model.layers]
    for lw in model.layers:
        lw.attention = Timed(lw.attention, spent, switch)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, o.vocab, (1, o.prompt_len), generator=gen)
    kv = KVCache(model.spec, 1, o.prompt_len + o.new_tokens, model.dtype, model.device, model.layer_stores)
    logits = model.forward(ids, torch.ones_like(ids), torch.arange(o.prompt_len)[None], kv, last_only=True)
    switch[0] = True
    start = time.perf_counter()
    for t in range(o.prompt_len, o.prompt_len + o.new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        logits = model.forward(token, torch.ones(1, t + 1, dtype=torch.long), torch.tensor([[t]]), kv, last_only=True)
    wall = time.perf_counter() - start
    counts = {name: pieces.count(name) for name in set(pieces)}
    return {"ms_per_token": 1e3 * wall / o.new_tokens,
            "attention_ms_per_layer_token": {n: 1e3 * s / (counts[n] * o.new_tokens) for n, s in spent.items()}}


def by_construction(path: Path, o: Options) -> dict:
    """Per decoded token and layer, what each attention piece reads and computes at --prompt-len tokens of context:
    weight bytes (2 FLOPs per weight), the KV or state bytes read, and the attention / recurrence FLOPs."""
    plan = offload.plan_checkpoint(path)
    spec, family, itemsize = plan.spec, plan.family, getattr(torch, o.dtype).itemsize
    pieces = family.layer_pieces(spec)
    out = {}
    for layer, name in enumerate(pieces):
        if name in out:
            continue
        weights = sum(t.nbytes // t.dtype.itemsize for t in plan.dense.values()
                      if f"layers.{layer}.self_attn." in t.name or f"layers.{layer}.linear_attn." in t.name)
        per_token, fixed = sequence_nbytes(spec, getattr(torch, o.dtype), [name] * spec.num_layers)
        per_token, fixed = per_token // spec.num_layers, fixed // spec.num_layers
        if fixed:  # the recurrence: decay, recall (S^T k), write (k delta^T), read (S^T q): ~7 FLOPs per state entry
            state = spec.linear_num_value_heads * spec.linear_key_head_dim * spec.linear_value_head_dim
            flops, read = 2 * weights + 7 * state, 2 * fixed  # the state is read and written back
        else:  # scores and the weighted sum over the context: 4 FLOPs per head dim per key per query head
            flops, read = 2 * weights + 4 * spec.num_heads * spec.head_dim * o.prompt_len, per_token * o.prompt_len
        out[name] = {"weight_bytes": weights * itemsize, "state_or_kv_bytes_read": read, "flops": flops}
    return out


def table(rows: dict[str, dict]) -> str:
    lines = ["| family | decode ms / token (median) | attention ms / layer / token (median) | "
             "bytes read / layer / token (weights + state or KV) | FLOPs / layer / token |", "|---|---|---|---|---|"]
    for family, r in rows.items():
        att = ", ".join(f"{n} {v:.3f}" for n, v in r["attention_ms_per_layer_token"].items())
        cost = r["by_construction"]
        read = ", ".join(f"{n} {c['weight_bytes'] + c['state_or_kv_bytes_read']:,}" for n, c in cost.items())
        flops = ", ".join(f"{n} {c['flops']:,}" for n, c in cost.items())
        lines.append(f"| {family} | {r['ms_per_token']:.2f} | {att} | {read} | {flops} |")
    return "\n".join(lines)


@app.command()
def bench(
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 512,
    layers: Annotated[int, typer.Option(help="Decoder layers (Qwen3.5: every fourth is full attention).")] = 8,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 8,
    kv_heads: Annotated[int, typer.Option(help="Key/value heads of the full-attention layers.")] = 2,
    head_dim: Annotated[int, typer.Option(help="Head dim of the full-attention layers.")] = 64,
    experts: Annotated[int, typer.Option(help="Experts per layer.")] = 16,
    top_k: Annotated[int, typer.Option(help="Experts per token.")] = 4,
    expert_intermediate: Annotated[int, typer.Option(help="Expert (and shared expert) width.")] = 256,
    linear_key_heads: Annotated[int, typer.Option(help="Gated DeltaNet key heads.")] = 4,
    linear_value_heads: Annotated[int, typer.Option(help="Gated DeltaNet value heads.")] = 8,
    linear_head_dim: Annotated[int, typer.Option(help="Gated DeltaNet key and value head dim.")] = 64,
    vocab: Annotated[int, typer.Option(help="Vocabulary size.")] = 4096,
    prompt_len: Annotated[int, typer.Option(help="Tokens of context before decoding.")] = 256,
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded per run.")] = 32,
    repeats: Annotated[int, typer.Option(help="Runs per family, alternating; medians.")] = 3,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16.")] = "float32",
    work_dir: Annotated[Path, typer.Option(help="Where the random models are made (kept, outside the repository).")
                        ] = Path("/tmp/offload-bench-families"),
    out: Annotated[Path, typer.Option(help="JSON file to write.")] = Path("scripts/results/bench_families.json"),
) -> None:
    """Decode ms per token of each family and each attention piece's ms per layer per token, with their costs."""
    opts = Options(**locals())  # every parameter above, nothing else yet
    torch.set_num_threads(threads)
    paths = {family: build(family, opts) for family in FAMILIES}
    samples: dict[str, list[dict]] = {family: [] for family in FAMILIES}
    for rep in range(repeats):  # alternate the order so neither family always runs first
        for family in (FAMILIES if rep % 2 == 0 else FAMILIES[::-1]):
            samples[family].append(run_one(paths[family], opts))
            err.print(f"{family:12s} run {rep + 1}: {samples[family][-1]['ms_per_token']:.2f} ms/token")
    rows = {}
    for family, runs in samples.items():
        names = runs[0]["attention_ms_per_layer_token"]
        rows[family] = {"ms_per_token": statistics.median(r["ms_per_token"] for r in runs),
                        "attention_ms_per_layer_token": {
                            n: statistics.median(r["attention_ms_per_layer_token"][n] for r in runs) for n in names},
                        "by_construction": by_construction(paths[family], opts), "samples": runs}
    markdown = table(rows)
    print(markdown)
    write_json(out, {"benchmark": "bench_families", "command": " ".join(sys.argv),
                     "params": {k: str(v) for k, v in asdict(opts).items()},
                     "machine": {**machine_info("transformers"), "torch": torch.__version__},
                     "families": rows, "table": markdown})
    err.print(f"wrote {out}")


if __name__ == "__main__":
    main(app)
