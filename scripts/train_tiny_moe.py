"""Train the small MoE models that ship with offload (offload/bundled/tiny-moe and tiny-moe-64).

No model can be downloaded on a fresh machine, and a random model routes like noise, so the package ships
real, trained ones: a byte-level BPE tokenizer and a Mixtral-, OLMoE- or Qwen3-MoE-architecture model trained
from scratch on the Python standard library's own source. They are small enough to train on one CPU core in
about an hour and to ship inside the wheel, and trained enough that their experts specialise, which is what
routing traces, predictors and cache policies need to be studied on.

Everything is seeded and the data order is fixed, so the same command on the same machine (same torch, same
thread count) reproduces the same weights. Thread count matters: CPU reductions split differently.

    # tiny-moe: Mixtral, 8 experts of 256, top-2 (the defaults)
    python scripts/train_tiny_moe.py --out /tmp/tiny-moe --steps 1800 --threads 1
    # tiny-moe-64: OLMoE, 64 experts of 32, top-8, with tiny-moe's tokenizer
    python scripts/train_tiny_moe.py --out /tmp/tiny-moe-64 --architecture olmoe --experts 64 --top-k 8 \\
        --intermediate 32 --tokenizer offload/bundled/tiny-moe/tokenizer.json --steps 2000 --threads 1

Writes the folder --out (as OUT.partial, renamed when complete; an existing non-empty --out is refused):
config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json and
training_report.json (data, loss curve, validation against a unigram baseline, routing statistics on
held-out modules, greedy samples).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer

from cli.errors import one_line_errors
from offload.errors import ConfigError
from offload.files import atomic_output

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
DTYPES = ("auto", "float32", "bfloat16")

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)


@dataclass(frozen=True)
class Source:
    """One standard-library module: its dotted name and its text."""

    module: str
    text: str


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Architecture:
    """One transformers MoE family: its classes and how its config spells the expert shape."""

    config_class: str
    model_class: str
    expert_fields: Callable[[TrainConfig], dict]
    always_renormalises: bool  # Mixtral's router renormalises its top-k weights and has no switch for it


def _mixtral_fields(cfg: TrainConfig) -> dict:
    return {"num_local_experts": cfg.experts, "intermediate_size": cfg.intermediate}


def _olmoe_fields(cfg: TrainConfig) -> dict:
    return {"num_experts": cfg.experts, "intermediate_size": cfg.intermediate,
            "norm_topk_prob": bool(cfg.norm_topk_prob)}


def _qwen3_moe_fields(cfg: TrainConfig) -> dict:
    # Every layer sparse; intermediate_size (the dense MLP's) is then unused and set equal, not left at 6144.
    return {"num_experts": cfg.experts, "moe_intermediate_size": cfg.intermediate,
            "intermediate_size": cfg.intermediate, "norm_topk_prob": bool(cfg.norm_topk_prob),
            "decoder_sparse_step": 1, "mlp_only_layers": []}


ARCHITECTURES: dict[str, Architecture] = {
    "mixtral": Architecture("MixtralConfig", "MixtralForCausalLM", _mixtral_fields, always_renormalises=True),
    "olmoe": Architecture("OlmoeConfig", "OlmoeForCausalLM", _olmoe_fields, always_renormalises=False),
    "qwen3_moe": Architecture("Qwen3MoeConfig", "Qwen3MoeForCausalLM", _qwen3_moe_fields, always_renormalises=False),
}


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one training run (the defaults are tiny-moe's); recorded as the report's "args"."""

    threads: int = os.cpu_count() or 1  # torch and tokenizer threads
    seed: int = 0  # init, data order and the held-out split
    steps: int = 1800  # optimizer steps
    batch_size: int = 16  # sequences per step
    seq_len: int = 256  # tokens per training sequence
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay on matrices (not norms)
    grad_clip: float = 1.0  # max global grad norm
    vocab_size: int = 4096  # BPE vocabulary size, special token included (when the tokenizer is trained)
    hidden: int = 128
    intermediate: int = 256  # expert FFN size
    layers: int = 5
    heads: int = 4
    kv_heads: int = 2  # GQA
    experts: int = 8  # per layer
    top_k: int = 2
    aux_loss_coef: float = 0.02  # per-layer router load-balancing loss weight
    max_positions: int = 1024
    val_percent: int = 5  # share of modules held out, by name hash
    max_file_bytes: int = 300_000  # skip larger (generated) files
    log_every: int = 10  # loss-curve interval in steps
    dtype: str = "auto"  # saved weight dtype; auto keeps float32 while the weights fit max_mb
    max_mb: float = 24.0  # size budget of the saved weights, MiB
    sample_tokens: int = 60  # greedy tokens per sample
    architecture: str = "mixtral"
    norm_topk_prob: bool | None = None  # None: the family's own (Mixtral: always; OLMoE, Qwen3-MoE: off)
    tokenizer: str | None = None  # a tokenizer.json to reuse instead of training one

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown --architecture {self.architecture!r}", f"one of {', '.join(ARCHITECTURES)}")
        if self.heads % self.kv_heads or self.hidden % self.heads:
            raise ConfigError("--heads must divide --hidden and be a multiple of --kv-heads")
        if not 1 <= self.top_k <= self.experts:
            raise ConfigError(f"--top-k {self.top_k} must be between 1 and --experts {self.experts}")
        if self.norm_topk_prob is False and ARCHITECTURES[self.architecture].always_renormalises:
            raise ConfigError("Mixtral always renormalises its top-k weights", "drop --no-norm-topk-prob")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown --dtype {self.dtype!r}", f"one of {', '.join(DTYPES)}")
        if self.tokenizer is not None and not Path(self.tokenizer).is_file():
            raise ConfigError(f"--tokenizer {self.tokenizer} is not a file", "give a tokenizer.json")
        if min(self.threads, self.steps, self.batch_size, self.seq_len, self.warmup_steps, self.log_every) < 1:
            raise ConfigError("--threads, --steps, --batch-size, --seq-len, --warmup-steps and --log-every "
                              "must be at least 1")


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


def load_tokenizer(path: str):
    """A saved tokenizer.json (another bundled model's, so that perplexities compare token for token)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    if tok.token_to_id(EOT) is None:
        raise ConfigError(f"--tokenizer {path} has no {EOT} token", "give a tokenizer written by this script")
    return tok


def encode_stream(tok, texts: list[str], eot_id: int):
    """One token stream: EOT doc EOT doc ... EOT; int64 [n_tokens]."""
    ids = [eot_id]
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot_id)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream, seq_len: int):
    """Non-overlapping [n, seq_len] windows; the model shifts labels itself, the tail that does not fill one is
    dropped."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


@dataclass
class Data:
    """The split, the tokenizer and the token streams of one run."""

    stdlib: Path
    skipped: dict[str, int]
    train_src: list[Source]
    val_src: list[Source]
    tok: object  # tokenizers.Tokenizer
    train_stream: torch.Tensor  # [train tokens]
    val_stream: torch.Tensor  # [val tokens]

    @property
    def eot_id(self) -> int:
        return self.tok.token_to_id(EOT)


def load_data(cfg: TrainConfig) -> Data:
    """Split the stdlib by module-name hash, train (or load) the tokenizer on the train part, encode both."""
    t0 = time.time()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources, skipped = collect_sources(stdlib, cfg.max_file_bytes)
    train_src = [s for s in sources if not is_held_out(s.module, cfg.val_percent, cfg.seed)]
    val_src = [s for s in sources if is_held_out(s.module, cfg.val_percent, cfg.seed)]
    print(f"{len(train_src)} train / {len(val_src)} val modules from {stdlib}", flush=True)
    if cfg.tokenizer is None:
        tok = train_tokenizer([s.text for s in train_src], cfg.vocab_size)
    else:
        tok = load_tokenizer(cfg.tokenizer)
    eot_id = tok.token_to_id(EOT)
    data = Data(stdlib, skipped, train_src, val_src, tok, encode_stream(tok, [s.text for s in train_src], eot_id),
                encode_stream(tok, [s.text for s in val_src], eot_id))
    train_bytes = sum(len(s.text.encode()) for s in train_src)
    print(f"{data.train_stream.numel()} train tokens ({train_bytes / data.train_stream.numel():.2f} bytes/token), "
          f"{data.val_stream.numel()} val tokens; tokenizer {time.time() - t0:.0f} s", flush=True)
    return data


# ---------------------------------------------------------------------------------------------- model


def make_config(cfg: TrainConfig, vocab_size: int, eot_id: int):
    import transformers

    arch = ARCHITECTURES[cfg.architecture]
    return getattr(transformers, arch.config_class)(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_positions,
        num_experts_per_tok=cfg.top_k,
        output_router_logits=True,
        router_aux_loss_coef=cfg.aux_loss_coef,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
        **arch.expert_fields(cfg),
    )


def model_class(cfg: TrainConfig):
    import transformers

    return getattr(transformers, ARCHITECTURES[cfg.architecture].model_class)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to --lr, then cosine down to --lr * --min-lr-ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, cfg: TrainConfig):
    # Norm gains are 1-D; decaying them towards 0 only fights the normalisation.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def balance_loss(router_logits, top_k: int):
    """Switch-Transformer load-balancing loss per layer, averaged over layers; also each layer's expert shares.

    transformers' own Mixtral aux loss pools the top-k counts of all layers before balancing, so it only
    balances expert *index* i summed over layers: a first run with it kept experts dead in layers 3 and 4
    while another layer's expert i carried their share. Balancing each layer on its own fixes that. The
    scale matches transformers' (counts normalised per token, so a balanced layer scores top_k), so
    --aux-loss-coef means the same thing as config.router_aux_loss_coef.
    """
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


def train_step(model, batch, opt, cfg: TrainConfig, lr: float):
    """One AdamW step on [batch, seq] tokens; returns (cross-entropy, aux loss, grad norm, [layers, experts] shares)."""
    import torch.nn.functional as F

    for group in opt.param_groups:
        group["lr"] = lr
    # No labels: transformers would add its pooled aux loss; the loss is assembled here instead.
    out = model(input_ids=batch, output_router_logits=True)
    logits = out.logits[:, :-1].float()  # [batch, seq-1, vocab]
    lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    aux_loss, shares = balance_loss(out.router_logits, cfg.top_k)
    (lm_loss + cfg.aux_loss_coef * aux_loss).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(lm_loss.detach()), float(aux_loss.detach()), float(grad_norm), shares.detach()


def train(model, train_windows, cfg: TrainConfig) -> list[dict]:
    """Runs --steps AdamW steps over reshuffled epochs of the training windows; returns the loss curve."""
    gen = torch.Generator().manual_seed(cfg.seed)
    order, cursor, epoch = torch.randperm(len(train_windows), generator=gen), 0, 0
    opt = make_optimizer(model, cfg)
    curve, t0 = [], time.time()
    acc = {"loss": 0.0, "aux": 0.0, "n": 0, "shares": 0.0}
    model.train()
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > len(order):
            order, cursor, epoch = torch.randperm(len(train_windows), generator=gen), 0, epoch + 1
        batch = train_windows[order[cursor : cursor + cfg.batch_size]]  # [batch, seq]
        cursor += cfg.batch_size
        lr = lr_at(step, cfg)
        lm_loss, aux_loss, grad_norm, shares = train_step(model, batch, opt, cfg, lr)
        acc["loss"] += lm_loss
        acc["aux"] += aux_loss
        acc["shares"] = acc["shares"] + shares
        acc["n"] += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            curve.append(log_row(step, epoch, lr, grad_norm, acc, time.time() - t0, cfg))
            acc = {"loss": 0.0, "aux": 0.0, "n": 0, "shares": 0.0}
    return curve


def log_row(step: int, epoch: int, lr: float, grad_norm: float, acc: dict, elapsed: float, cfg: TrainConfig) -> dict:
    """One loss-curve entry (means over the steps since the last one), also printed."""
    shares = acc["shares"] / acc["n"]  # [layers, experts]
    row = {
        "step": step + 1,
        "epoch": epoch,
        "train_loss": round(acc["loss"] / acc["n"], 4),
        "aux_loss": round(acc["aux"] / acc["n"], 4),
        "lr": lr,
        "grad_norm": round(grad_norm, 3),
        "expert_share_min": [round(float(v), 4) for v in shares.min(-1).values],
        "elapsed_s": round(elapsed, 1),
    }
    tok_s = (step + 1) * cfg.batch_size * cfg.seq_len / elapsed
    print(f"step {step + 1:5d}/{cfg.steps} loss {row['train_loss']:.3f} aux {row['aux_loss']:.3f} "
          f"min share {float(shares.min()):.3f} lr {lr:.2e} {tok_s:.0f} tok/s {elapsed / 60:.1f} min", flush=True)
    return row


# ----------------------------------------------------------------------------------------- evaluation


def iter_batches(val_windows, batch_size: int):
    for i in range(0, len(val_windows), batch_size):
        yield val_windows[i : i + batch_size]


def validation_loss(model, val_windows, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over every predicted position of the held-out windows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in iter_batches(val_windows, batch_size):
            logits = model(input_ids=batch).logits[:, :-1].float()  # [b, seq-1, vocab]
            targets = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                    reduction="sum")
            total += float(nll)
            count += targets.numel()
    return total / count


def unigram_loss(train_stream, val_windows, vocab_size: int) -> float:
    """Cross-entropy of an add-one-smoothed unigram model of the train tokens on the same val targets."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[val_windows[:, 1:].reshape(-1)].mean())


def routed_experts(model, val_windows, batch_size: int) -> tuple[list, list]:
    """Per layer: each held-out token's top-k experts [n_windows, seq, k] and router entropies [tokens]."""
    k = model.config.num_experts_per_tok
    topk, entropy = None, None
    with torch.no_grad():
        for batch in iter_batches(val_windows, batch_size):
            out = model(input_ids=batch, output_router_logits=True)
            if topk is None:
                topk, entropy = [[] for _ in out.router_logits], [[] for _ in out.router_logits]
            for layer, logits in enumerate(out.router_logits):  # logits: [b*seq, experts]
                probs = logits.float().softmax(-1)
                # top-k by router probability, best first, as the routers pick them
                topk[layer].append(probs.topk(k, dim=-1).indices.view(*batch.shape, k))
                entropy[layer].append(-(probs * probs.clamp_min(1e-12).log()).sum(-1))
    return [torch.cat(t) for t in topk], [torch.cat(e) for e in entropy]


def routing_stats(model, val_windows, batch_size: int, seed: int) -> dict:
    """Expert usage, router entropy and token-to-token / layer-to-layer locality on held-out windows."""
    k, n_exp = model.config.num_experts_per_tok, model.config.num_local_experts
    topk, entropy = routed_experts(model, val_windows, batch_size)
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for layer, sel in enumerate(topk):  # sel: [n_windows, seq, k]
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
            "entropy_nats": round(float(entropy[layer].mean()), 4),
            "consecutive_any_reuse": round(float(_any_overlap(cur, nxt).float().mean()), 4),
            "consecutive_top1_repeat": round(float((cur[..., 0] == nxt[..., 0]).float().mean()), 4),
            "shuffled_any_reuse": round(float(_any_overlap(flat, shuffled).float().mean()), 4),
            "shuffled_top1_repeat": round(float((flat[:, 0] == shuffled[:, 0]).float().mean()), 4),
            # With top-8 of 64 nearly every pair shares some expert; the shared share is what a cache keeps.
            "consecutive_mean_overlap": round(float(_overlap(cur, nxt).mean()), 4),
            "shuffled_mean_overlap": round(float(_overlap(flat, shuffled).mean()), 4),
        })
    cross = [_cross_layer(i, topk[i][..., 0], topk[i + 1][..., 0], n_exp) for i in range(len(topk) - 1)]
    return {
        "tokens": int(val_windows.numel()),
        "max_entropy_nats": round(math.log(n_exp), 4),
        "uniform_any_reuse": round(1 - math.comb(n_exp - k, k) / math.comb(n_exp, k), 4),
        "uniform_top1_repeat": round(1 / n_exp, 4),
        "uniform_mean_overlap": round(k / n_exp, 4),
        "layers": layers,
        "cross_layer_top1": cross,
    }


def _any_overlap(a, b):
    """[..., k] x [..., k] expert sets -> [...] bool: do they share an expert?"""
    return (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).any(-1)


def _overlap(a, b):
    """[..., k] x [..., k] expert sets -> [...] float: the share of a's k experts that b also has."""
    return (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().mean(-1)


def _cross_layer(layer: int, src, dst, n_exp: int) -> dict:
    """How well layer l's top-1 expert predicts layer l+1's, by the best fixed mapping (in-sample on val)."""
    src, dst = src.reshape(-1), dst.reshape(-1)
    joint = torch.bincount(src * n_exp + dst, minlength=n_exp * n_exp).view(n_exp, n_exp).double()
    n = joint.sum()
    return {
        "from_layer": layer,
        "mapped_accuracy": round(float(joint.max(1).values.sum() / n), 4),
        "majority_baseline": round(float(joint.sum(0).max() / n), 4),
    }


def greedy_samples(model, tok, prompts, max_new_tokens: int) -> list[dict]:
    samples = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tok.encode(prompt).ids])  # EOT + prompt
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
            samples.append({"prompt": prompt, "completion": tok.decode(out[0, ids.shape[1]:].tolist())})
    return samples


# ---------------------------------------------------------------------------------------------- saving


def choose_dtype(model, cfg: TrainConfig) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    return "float32" if mb <= cfg.max_mb else "bfloat16"


def save_package(model, tok, out: Path, dtype: str, max_len: int) -> None:
    """The Hugging Face folder offload and transformers load: weights, configs, tokenizer."""
    from transformers import GenerationConfig

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
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def tokenizer_source(cfg: TrainConfig) -> dict:
    if cfg.tokenizer is None:
        return {"trained": True, "vocab_size": cfg.vocab_size}
    digest = hashlib.sha256(Path(cfg.tokenizer).read_bytes()).hexdigest()
    return {"trained": False, "file": cfg.tokenizer, "sha256": digest}


# ------------------------------------------------------------------------------------------------ main


def data_report(data: Data, cfg: TrainConfig, n_train_windows: int, val_w) -> dict:
    return {
        "stdlib": str(data.stdlib),
        "skipped_files": data.skipped,
        "split": f"module held out when md5('{cfg.seed}:' + module) % 100 < {cfg.val_percent}",
        "tokenizer": tokenizer_source(cfg),
        "train_files": len(data.train_src),
        "val_files": len(data.val_src),
        "train_bytes": sum(len(s.text.encode()) for s in data.train_src),
        "val_bytes": sum(len(s.text.encode()) for s in data.val_src),
        "train_tokens": int(data.train_stream.numel()),
        "val_tokens": int(data.val_stream.numel()),
        "val_tokens_scored": int(val_w[:, 1:].numel()),
        "tokens_seen_in_training": cfg.steps * cfg.batch_size * cfg.seq_len,
        "epochs": round(cfg.steps * cfg.batch_size / n_train_windows, 3),
        "val_modules": [s.module for s in data.val_src],
    }


def model_report(model, dtype: str, folder: Path) -> dict:
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    # Per token: every non-expert weight but the embedding table (a lookup, not a matmul), and top_k experts.
    k, n_exp = model.config.num_experts_per_tok, model.config.num_local_experts
    embed = model.get_input_embeddings().weight.numel()
    return {
        "config": json.loads(model.config.to_json_string()),
        "parameters": n_params,
        "expert_parameters": n_expert,
        "active_parameters_per_token": n_params - n_expert - embed + n_expert * k // n_exp,
        "saved_dtype": dtype,
        "weights_bytes": (folder / "model.safetensors").stat().st_size,
    }


def evaluate(folder: Path, data: Data, val_w, cfg: TrainConfig, dtype: str) -> tuple[object, dict]:
    """Evaluate what ships: reload the saved folder, in its saved dtype; returns (model, report parts)."""
    import tokenizers

    model = model_class(cfg).from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    val_loss = validation_loss(model, val_w, cfg.batch_size)
    uni_loss = unigram_loss(data.train_stream, val_w, tok.get_vocab_size())
    parts = {
        "validation": {
            "loss": round(val_loss, 4),
            "perplexity": round(math.exp(val_loss), 2),
            "unigram_loss": round(uni_loss, 4),
            "unigram_perplexity": round(math.exp(uni_loss), 2),
        },
        "routing": routing_stats(model, val_w, cfg.batch_size, cfg.seed),
        "samples": greedy_samples(model, tok, SAMPLE_PROMPTS, cfg.sample_tokens),
    }
    return model, parts


def print_summary(report: dict) -> None:
    v = report["validation"]
    print(f"val loss {v['loss']} ppl {v['perplexity']} (unigram ppl {v['unigram_perplexity']})")
    for row in report["routing"]["layers"]:
        print(f"layer {row['layer']}: usage {row['usage_min']:.3f}-{row['usage_max']:.3f} "
              f"entropy {row['entropy_nats']:.2f} "
              f"reuse {row['consecutive_any_reuse']:.2f} (shuffled {row['shuffled_any_reuse']:.2f}) "
              f"overlap {row['consecutive_mean_overlap']:.2f} (shuffled {row['shuffled_mean_overlap']:.2f}) "
              f"top1 repeat {row['consecutive_top1_repeat']:.2f} (shuffled {row['shuffled_top1_repeat']:.2f})")
    for s in report["samples"][:3]:
        print(f"--- {s['prompt']!r}\n{s['prompt']}{s['completion']}")


def run(cfg: TrainConfig, out: Path) -> dict:
    """Train, save into OUT.partial, evaluate the saved model, write the report, rename to OUT."""
    t_start = time.time()
    # Refuses a non-empty OUT now, not after an hour of training.
    with atomic_output(out, directory=True) as folder:
        data = load_data(cfg)
        train_w, val_w = windows(data.train_stream, cfg.seq_len), windows(data.val_stream, cfg.seq_len)
        model = model_class(cfg)(make_config(cfg, data.tok.get_vocab_size(), data.eot_id))
        n_params = sum(p.numel() for p in model.parameters())
        n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        print(f"{n_params / 1e6:.2f} M parameters ({n_expert / 1e6:.2f} M in experts)", flush=True)
        t_train = time.time()
        curve = train(model, train_w, cfg)
        train_s = time.time() - t_train
        dtype = choose_dtype(model, cfg)
        save_package(model, data.tok, folder, dtype, cfg.max_positions)
        model, parts = evaluate(folder, data, val_w, cfg, dtype)
        report = {
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "args": {"out": str(out), **dataclasses.asdict(cfg)},
            "machine": machine(),
            "threads": cfg.threads,
            "model": model_report(model, dtype, folder),
            "data": data_report(data, cfg, len(train_w), val_w),
            "wall_time_s": {"total": None, "training": round(train_s, 1),
                            "train_tokens_per_s": round(cfg.steps * cfg.batch_size * cfg.seq_len / train_s, 1)},
            "objective": "next-token cross-entropy + aux_loss_coef * mean over layers of each layer's "
                         "Switch load-balancing loss (see balance_loss); loss_curve's train_loss is the cross-entropy",
            "loss_curve": curve,
            **parts,
        }
        report["wall_time_s"]["total"] = round(time.time() - t_start, 1)
        (folder / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="Output folder (Hugging Face layout); must not exist or be empty.")],
    threads: Annotated[int, typer.Option(help="torch and tokenizer threads.")] = TrainConfig.threads,
    seed: Annotated[int, typer.Option(help="Seed for init, data order and the held-out split.")] = TrainConfig.seed,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = TrainConfig.steps,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = TrainConfig.batch_size,
    seq_len: Annotated[int, typer.Option(help="Tokens per training sequence.")] = TrainConfig.seq_len,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = TrainConfig.lr,
    min_lr_ratio: Annotated[float, typer.Option(help="Cosine decays to lr * this.")] = TrainConfig.min_lr_ratio,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = TrainConfig.warmup_steps,
    weight_decay: Annotated[float, typer.Option(help="AdamW decay on matrices (not norms).")]
    = TrainConfig.weight_decay,
    grad_clip: Annotated[float, typer.Option(help="Max global grad norm.")] = TrainConfig.grad_clip,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size, special token included (ignored with "
                                                 "--tokenizer).")] = TrainConfig.vocab_size,
    tokenizer: Annotated[Path | None, typer.Option(help="Reuse this tokenizer.json instead of training one "
                                                           "(tiny-moe's, so perplexities compare).")] = None,
    architecture: Annotated[str, typer.Option(help="Model family: " + ", ".join(ARCHITECTURES) + ".")]
    = TrainConfig.architecture,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = TrainConfig.hidden,
    intermediate: Annotated[int, typer.Option(help="Expert FFN size.")] = TrainConfig.intermediate,
    layers: Annotated[int, typer.Option(help="Decoder layers (all MoE).")] = TrainConfig.layers,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = TrainConfig.heads,
    kv_heads: Annotated[int, typer.Option(help="Key/value heads (GQA).")] = TrainConfig.kv_heads,
    experts: Annotated[int, typer.Option(help="Experts per layer.")] = TrainConfig.experts,
    top_k: Annotated[int, typer.Option(help="Experts per token.")] = TrainConfig.top_k,
    norm_topk_prob: Annotated[bool | None, typer.Option(help="Renormalise the top-k routing weights to sum to 1 "
                                                                "(default: the family's; Mixtral always does).")]
    = None,
    aux_loss_coef: Annotated[float, typer.Option(help="Per-layer router load-balancing loss weight.")]
    = TrainConfig.aux_loss_coef,
    max_positions: Annotated[int, typer.Option(help="max_position_embeddings.")] = TrainConfig.max_positions,
    val_percent: Annotated[int, typer.Option(help="Share of modules held out, by name hash.")]
    = TrainConfig.val_percent,
    max_file_bytes: Annotated[int, typer.Option(help="Skip larger (generated) files.")] = TrainConfig.max_file_bytes,
    log_every: Annotated[int, typer.Option(help="Loss-curve interval in steps.")] = TrainConfig.log_every,
    dtype: Annotated[str, typer.Option(help="Saved weight dtype: auto (float32 while the weights fit --max-mb), "
                                            "float32, bfloat16.")] = TrainConfig.dtype,
    max_mb: Annotated[float, typer.Option(help="Size budget of the saved weights, MiB.")] = TrainConfig.max_mb,
    sample_tokens: Annotated[int, typer.Option(help="Greedy tokens per sample.")] = TrainConfig.sample_tokens,
) -> None:
    """Train a small MoE on the standard library's source and write it with its training report."""
    with one_line_errors():
        cfg = TrainConfig(
            threads=threads, seed=seed, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
            min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip,
            vocab_size=vocab_size, hidden=hidden, intermediate=intermediate, layers=layers, heads=heads,
            kv_heads=kv_heads, experts=experts, top_k=top_k, aux_loss_coef=aux_loss_coef,
            max_positions=max_positions, val_percent=val_percent, max_file_bytes=max_file_bytes,
            log_every=log_every, dtype=dtype, max_mb=max_mb, sample_tokens=sample_tokens,
            architecture=architecture, norm_topk_prob=norm_topk_prob,
            tokenizer=None if tokenizer is None else str(tokenizer),
        )
        # Before tokenizers starts its thread pool.
        os.environ["RAYON_NUM_THREADS"] = str(cfg.threads)
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        print_summary(run(cfg, out))


if __name__ == "__main__":
    app()
