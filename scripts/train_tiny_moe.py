"""Train the small Mixtral-architecture MoE that ships with offload (offload/models/tiny-moe).

No model can be downloaded on a fresh machine, and a random model routes like noise, so the package ships a
real, trained one: a byte-level BPE tokenizer and a MixtralForCausalLM trained from scratch on the Python
standard library's own source. It is small enough to train on 2 CPU cores in well under an hour and to ship
inside the wheel, and trained enough that its experts specialise, which is what routing traces, predictors
and cache policies need to be studied on.

Everything is seeded and the data order is fixed, so the same command on the same machine (same torch, same
thread count) reproduces the same weights. Thread count matters: CPU reductions split differently.

    python scripts/train_tiny_moe.py --out /tmp/tiny-moe --steps 1800 --threads 1

Writes to --out: config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json and training_report.json (data, loss curve, validation against a unigram baseline,
routing statistics on held-out modules, greedy samples).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

EOT = "<|endoftext|>"
# Directories whose files are test suites or vendored packages, not the library's own code.
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
# Marker of the generated charmap tables in encodings/: 35 KB of hex each, and no Python to learn from.
GENERATED_MARKER = "gencodec.py"
SAMPLE_PROMPTS = (
    "def fibonacci(n):",
    "import os\n",
    "class Stack:",
    "    def __init__(self, ",
    "for i in range(",
)


@dataclass(frozen=True)
class Source:
    """One standard-library module: its dotted name and its text."""

    module: str
    text: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (Hugging Face layout)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and tokenizer threads")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and the held-out split")
    p.add_argument("--steps", type=int, default=1800, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay on matrices (not norms)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size, special token included")
    p.add_argument("--hidden", type=int, default=128, help="hidden size")
    p.add_argument("--intermediate", type=int, default=256, help="expert FFN size")
    p.add_argument("--layers", type=int, default=5, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--experts", type=int, default=8, help="experts per layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--aux-loss-coef", type=float, default=0.02, help="per-layer router load-balancing loss weight")
    p.add_argument("--max-positions", type=int, default=1024, help="max_position_embeddings")
    p.add_argument("--val-percent", type=int, default=5, help="share of modules held out, by name hash")
    p.add_argument("--max-file-bytes", type=int, default=300_000, help="skip larger (generated) files")
    p.add_argument("--log-every", type=int, default=10, help="loss-curve interval in steps")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="saved weight dtype; auto keeps float32 while the weights fit --max-mb")
    p.add_argument("--max-mb", type=float, default=24.0, help="size budget of the saved weights")
    p.add_argument("--sample-tokens", type=int, default=60, help="greedy tokens per sample")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- data


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def collect_sources(stdlib: Path, max_bytes: int) -> tuple[list[Source], dict[str, int]]:
    """The standard library's own .py files in sorted path order, without tests and generated tables."""
    sources, skipped = [], {"test_dirs": 0, "too_large": 0, "generated": 0, "undecodable": 0}
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if SKIP_DIRS.intersection(rel.parts[:-1]):
            skipped["test_dirs"] += 1
            continue
        if path.stat().st_size > max_bytes:
            skipped["too_large"] += 1
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            skipped["undecodable"] += 1
            continue
        if GENERATED_MARKER in text[:2000] or rel.name.startswith("_sysconfigdata"):
            skipped["generated"] += 1
            continue
        sources.append(Source(module_name(rel), text))
    return sources, skipped


def is_held_out(module: str, percent: int, seed: int) -> bool:
    # md5, not hash(): str hashes are salted per process and the split must not move between runs.
    digest = hashlib.md5(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < percent


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation); EOT is id 0 and is prepended to every encoded prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    eot_id = tok.token_to_id(EOT)
    # Training documents start after an EOT, so a prompt does too; encode(..., add_special_tokens=False) skips it.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, eot_id)]
    )
    return tok


def encode_stream(tok, texts: list[str], eot_id: int):
    """One token stream: EOT doc EOT doc ... EOT; int64 [n_tokens]."""
    import torch

    ids = [eot_id]
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot_id)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream, seq_len: int):
    """Non-overlapping [n, seq_len] windows; the model shifts labels itself, the tail that does not fill one is dropped."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


# ---------------------------------------------------------------------------------------------- model


def make_config(args: argparse.Namespace, vocab_size: int, eot_id: int):
    from transformers import MixtralConfig

    if args.heads % args.kv_heads or args.hidden % args.heads:
        sys.exit("error: --heads must divide --hidden and be a multiple of --kv-heads")
    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_loss_coef,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
    )


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to --lr, then cosine down to --lr * --min-lr-ratio at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, args: argparse.Namespace):
    import torch

    # Norm gains are 1-D; decaying them towards 0 only fights the normalisation.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def balance_loss(router_logits, top_k: int):
    """Switch-Transformer load-balancing loss per layer, averaged over layers; also each layer's expert shares.

    transformers' own Mixtral aux loss pools the top-k counts of all layers before balancing, so it only
    balances expert *index* i summed over layers: a first run with it kept experts dead in layers 3 and 4
    while another layer's expert i carried their share. Balancing each layer on its own fixes that. The
    scale matches transformers' (counts normalised per token, so a balanced layer scores top_k), so
    --aux-loss-coef means the same thing as config.router_aux_loss_coef.
    """
    import torch

    losses, shares = [], []
    for logits in router_logits:  # logits: [tokens, experts]
        probs = logits.float().softmax(-1)
        n_exp = probs.shape[-1]
        selected = probs.topk(top_k, dim=-1).indices  # [tokens, k]
        counts = torch.zeros(n_exp).index_add_(0, selected.reshape(-1), torch.ones(selected.numel()))
        frac = counts / probs.shape[0]  # sums to top_k
        losses.append(n_exp * (frac * probs.mean(0)).sum())
        shares.append(frac / top_k)
    return torch.stack(losses).mean(), torch.stack(shares)  # scalar, [layers, experts]


def train(model, train_windows, args: argparse.Namespace) -> list[dict]:
    """Runs --steps AdamW steps over reshuffled epochs of the training windows; returns the loss curve."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(args.seed)
    order, cursor, epoch = torch.randperm(len(train_windows), generator=gen), 0, 0
    opt = make_optimizer(model, args)
    coef, top_k = args.aux_loss_coef, model.config.num_experts_per_tok
    curve, t0 = [], time.time()
    acc = {"loss": 0.0, "aux": 0.0, "n": 0, "shares": 0.0}
    model.train()
    for step in range(args.steps):
        if cursor + args.batch_size > len(order):
            order, cursor, epoch = torch.randperm(len(train_windows), generator=gen), 0, epoch + 1
        batch = train_windows[order[cursor : cursor + args.batch_size]]  # [batch, seq]
        cursor += args.batch_size
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        # No labels: transformers would add its pooled aux loss; the loss is assembled here instead.
        out = model(input_ids=batch, output_router_logits=True)
        logits = out.logits[:, :-1].float()  # [batch, seq-1, vocab]
        lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        aux_loss, shares = balance_loss(out.router_logits, top_k)
        (lm_loss + coef * aux_loss).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc["loss"] += float(lm_loss.detach())
        acc["aux"] += float(aux_loss.detach())
        acc["shares"] = acc["shares"] + shares.detach()
        acc["n"] += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.time() - t0
            shares = acc["shares"] / acc["n"]  # [layers, experts]
            row = {
                "step": step + 1,
                "epoch": epoch,
                "train_loss": round(acc["loss"] / acc["n"], 4),
                "aux_loss": round(acc["aux"] / acc["n"], 4),
                "lr": lr,
                "grad_norm": round(float(grad_norm), 3),
                "expert_share_min": [round(float(v), 4) for v in shares.min(-1).values],
                "elapsed_s": round(elapsed, 1),
            }
            curve.append(row)
            tok_s = (step + 1) * args.batch_size * args.seq_len / elapsed
            print(f"step {step + 1:5d}/{args.steps} loss {row['train_loss']:.3f} aux {row['aux_loss']:.3f} "
                  f"min share {float(shares.min()):.3f} lr {lr:.2e} {tok_s:.0f} tok/s {elapsed / 60:.1f} min", flush=True)
            acc = {"loss": 0.0, "aux": 0.0, "n": 0, "shares": 0.0}
    return curve


# ----------------------------------------------------------------------------------------- evaluation


def iter_batches(val_windows, batch_size: int):
    for i in range(0, len(val_windows), batch_size):
        yield val_windows[i : i + batch_size]


def validation_loss(model, val_windows, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over every predicted position of the held-out windows."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in iter_batches(val_windows, batch_size):
            logits = model(input_ids=batch).logits[:, :-1].float()  # [b, seq-1, vocab]
            targets = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total += float(nll)
            count += targets.numel()
    return total / count


def unigram_loss(train_stream, val_windows, vocab_size: int) -> float:
    """Cross-entropy of an add-one-smoothed unigram model of the train tokens on the same val targets."""
    import torch

    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[val_windows[:, 1:].reshape(-1)].mean())


def routing_stats(model, val_windows, batch_size: int, seed: int) -> dict:
    """Expert usage, router entropy and token-to-token / layer-to-layer locality on held-out windows."""
    import torch

    k, n_exp = model.config.num_experts_per_tok, model.config.num_local_experts
    per_layer_topk, per_layer_entropy = None, None
    with torch.no_grad():
        for batch in iter_batches(val_windows, batch_size):
            out = model(input_ids=batch, output_router_logits=True)
            if per_layer_topk is None:
                per_layer_topk = [[] for _ in out.router_logits]
                per_layer_entropy = [[] for _ in out.router_logits]
            for layer, logits in enumerate(out.router_logits):  # logits: [b*seq, experts]
                probs = logits.float().softmax(-1)
                # top-k by router probability, best first, as the Mixtral router picks them
                per_layer_topk[layer].append(probs.topk(k, dim=-1).indices.view(*batch.shape, k))
                per_layer_entropy[layer].append(-(probs * probs.clamp_min(1e-12).log()).sum(-1))
    topk = [torch.cat(t) for t in per_layer_topk]  # each [n_windows, seq, k]
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for layer, sel in enumerate(topk):
        usage = torch.bincount(sel.reshape(-1), minlength=n_exp).double()
        usage = usage / usage.sum()
        cur, nxt = sel[:, :-1], sel[:, 1:]  # consecutive tokens inside a window
        # A token's experts against a random other token's: what reuse the usage imbalance alone would give.
        flat = sel.reshape(-1, k)
        shuffled = flat[torch.randperm(len(flat), generator=gen)]
        layers.append({
            "layer": layer,
            "usage": [round(float(u), 4) for u in usage],
            "usage_min": round(float(usage.min()), 4),
            "usage_max": round(float(usage.max()), 4),
            "entropy_nats": round(float(torch.cat(per_layer_entropy[layer]).mean()), 4),
            "consecutive_any_reuse": round(float(_any_overlap(cur, nxt).float().mean()), 4),
            "consecutive_top1_repeat": round(float((cur[..., 0] == nxt[..., 0]).float().mean()), 4),
            "shuffled_any_reuse": round(float(_any_overlap(flat, shuffled).float().mean()), 4),
            "shuffled_top1_repeat": round(float((flat[:, 0] == shuffled[:, 0]).float().mean()), 4),
        })
    cross = [_cross_layer(l, topk[l][..., 0], topk[l + 1][..., 0], n_exp) for l in range(len(topk) - 1)]
    return {
        "tokens": int(val_windows.numel()),
        "max_entropy_nats": round(math.log(n_exp), 4),
        "uniform_any_reuse": round(1 - math.comb(n_exp - k, k) / math.comb(n_exp, k), 4),
        "uniform_top1_repeat": round(1 / n_exp, 4),
        "layers": layers,
        "cross_layer_top1": cross,
    }


def _any_overlap(a, b):
    """[..., k] x [..., k] expert sets -> [...] bool: do they share an expert?"""
    return (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).any(-1)


def _cross_layer(layer: int, src, dst, n_exp: int) -> dict:
    """How well layer l's top-1 expert predicts layer l+1's, by the best fixed mapping (in-sample on val)."""
    import torch

    src, dst = src.reshape(-1), dst.reshape(-1)
    joint = torch.bincount(src * n_exp + dst, minlength=n_exp * n_exp).view(n_exp, n_exp).double()
    n = joint.sum()
    return {
        "from_layer": layer,
        "mapped_accuracy": round(float(joint.max(1).values.sum() / n), 4),
        "majority_baseline": round(float(joint.sum(0).max() / n), 4),
    }


def greedy_samples(model, tok, prompts, max_new_tokens: int) -> list[dict]:
    import torch

    samples = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tok.encode(prompt).ids])  # EOT + prompt
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
            samples.append({"prompt": prompt, "completion": tok.decode(out[0, ids.shape[1]:].tolist())})
    return samples


# ---------------------------------------------------------------------------------------------- saving


def choose_dtype(model, args: argparse.Namespace) -> str:
    if args.dtype != "auto":
        return args.dtype
    mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    return "float32" if mb <= args.max_mb else "bfloat16"


def save_package(model, tok, out: Path, dtype: str, max_len: int) -> None:
    import torch
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model = model.to(getattr(torch, dtype))
    eot_id = model.config.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id, do_sample=False, max_new_tokens=128
    )
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "add_bos_token": True,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Before tokenizers starts its thread pool.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    import tokenizers
    import torch
    from transformers import MixtralForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources, skipped = collect_sources(stdlib, args.max_file_bytes)
    train_src = [s for s in sources if not is_held_out(s.module, args.val_percent, args.seed)]
    val_src = [s for s in sources if is_held_out(s.module, args.val_percent, args.seed)]
    print(f"{len(train_src)} train / {len(val_src)} val modules from {stdlib}", flush=True)

    tok = train_tokenizer([s.text for s in train_src], args.vocab_size)
    eot_id = tok.token_to_id(EOT)
    train_stream = encode_stream(tok, [s.text for s in train_src], eot_id)
    val_stream = encode_stream(tok, [s.text for s in val_src], eot_id)
    train_w, val_w = windows(train_stream, args.seq_len), windows(val_stream, args.seq_len)
    train_bytes = sum(len(s.text.encode()) for s in train_src)
    print(f"{train_stream.numel()} train tokens ({train_bytes / train_stream.numel():.2f} bytes/token), "
          f"{val_stream.numel()} val tokens; tokenizer {time.time() - t_start:.0f} s", flush=True)

    config = make_config(args, tok.get_vocab_size(), eot_id)
    model = MixtralForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"{n_params / 1e6:.2f} M parameters ({n_expert / 1e6:.2f} M in experts)", flush=True)

    t_train = time.time()
    curve = train(model, train_w, args)
    train_s = time.time() - t_train

    dtype = choose_dtype(model, args)
    save_package(model, tok, args.out, dtype, args.max_positions)
    # Evaluate what ships: reload the saved folder, in its saved dtype.
    model = MixtralForCausalLM.from_pretrained(args.out, dtype=getattr(torch, dtype)).eval()
    tok = tokenizers.Tokenizer.from_file(str(args.out / "tokenizer.json"))
    val_loss = validation_loss(model, val_w, args.batch_size)
    uni_loss = unigram_loss(train_stream, val_w, tok.get_vocab_size())
    routing = routing_stats(model, val_w, args.batch_size, args.seed)
    samples = greedy_samples(model, tok, SAMPLE_PROMPTS, args.sample_tokens)

    report = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "threads": args.threads,
        "model": {
            "config": json.loads(model.config.to_json_string()),
            "parameters": n_params,
            "expert_parameters": n_expert,
            "saved_dtype": dtype,
            "weights_bytes": (args.out / "model.safetensors").stat().st_size,
        },
        "data": {
            "stdlib": str(stdlib),
            "skipped_files": skipped,
            "split": f"module held out when md5('{args.seed}:' + module) % 100 < {args.val_percent}",
            "train_files": len(train_src),
            "val_files": len(val_src),
            "train_bytes": train_bytes,
            "val_bytes": sum(len(s.text.encode()) for s in val_src),
            "train_tokens": int(train_stream.numel()),
            "val_tokens": int(val_stream.numel()),
            "val_tokens_scored": int(val_w[:, 1:].numel()),
            "tokens_seen_in_training": args.steps * args.batch_size * args.seq_len,
            "epochs": round(args.steps * args.batch_size / len(train_w), 3),
            "val_modules": [s.module for s in val_src],
        },
        "wall_time_s": {"total": None, "training": round(train_s, 1),
                        "train_tokens_per_s": round(args.steps * args.batch_size * args.seq_len / train_s, 1)},
        "objective": "next-token cross-entropy + aux_loss_coef * mean over layers of each layer's "
                     "Switch load-balancing loss (see balance_loss); loss_curve's train_loss is the cross-entropy",
        "loss_curve": curve,
        "validation": {
            "loss": round(val_loss, 4),
            "perplexity": round(math.exp(val_loss), 2),
            "unigram_loss": round(uni_loss, 4),
            "unigram_perplexity": round(math.exp(uni_loss), 2),
        },
        "routing": routing,
        "samples": samples,
    }
    report["wall_time_s"]["total"] = round(time.time() - t_start, 1)
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")

    v = report["validation"]
    print(f"val loss {v['loss']} ppl {v['perplexity']} (unigram ppl {v['unigram_perplexity']})")
    for row in routing["layers"]:
        print(f"layer {row['layer']}: usage {row['usage_min']:.3f}-{row['usage_max']:.3f} entropy {row['entropy_nats']:.2f} "
              f"reuse {row['consecutive_any_reuse']:.2f} (shuffled {row['shuffled_any_reuse']:.2f}) "
              f"top1 repeat {row['consecutive_top1_repeat']:.2f} (shuffled {row['shuffled_top1_repeat']:.2f})")
    for s in samples[:3]:
        print(f"--- {s['prompt']!r}\n{s['prompt']}{s['completion']}")


if __name__ == "__main__":
    main()
