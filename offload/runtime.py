"""from_pretrained(): checkpoint -> validated spec -> resident dense weights + expert cache -> OffloadModel."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from . import checkpoint as ckpt
from .cache import ExpertCache
from .config import ModelSpec, RuntimeConfig, parse_budget, parse_dtype, parse_prefetch_budget
from .errors import CheckpointError, ConfigError, DeviceError, OffloadError
from .experts import Key, packed_layout
from .families import Family, family_for_config
from .generate import generate as _generate
from .hardware import gpu_memories, host_memory
from .model import LayerWeights, MoEModel
from .policies import make_policy
from .stats import Stats
from .transfer import DirectReader, DiskExpertStore, RamExpertStore

log = logging.getLogger(__name__)

PREDICTOR_FILE = "predictor.safetensors"  # a learned predictor shipped beside the checkpoint

# progress(stage, done, total): stage is "dense" or "experts"
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CheckpointPlan:
    """A checkpoint read and validated, before any weight is loaded."""

    path: Path
    spec: ModelSpec
    family: Family
    tensors: dict[str, ckpt.TensorInfo]
    dense: dict[str, ckpt.TensorInfo]     # every resident tensor, by name
    experts: dict[Key, tuple[ckpt.TensorInfo, ckpt.TensorInfo, ckpt.TensorInfo]]

    @property
    def dense_nbytes(self) -> int:
        return sum(t.nbytes for t in self.dense.values())

    def expert_nbytes(self, dtype: torch.dtype | None = None) -> int:
        return self.spec.expert_params * (dtype or self.spec.checkpoint_dtype).itemsize


def _checkpoint_dtype(cfg: dict, tensors: dict[str, ckpt.TensorInfo]) -> torch.dtype:
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if isinstance(name, str) and name != "auto":
        dtype = parse_dtype(name)
        if dtype is not None:
            return dtype
    return next(iter(tensors.values())).dtype


def _dense_shapes(spec: ModelSpec, family: Family) -> dict[str, tuple[int, ...]]:
    """Every resident tensor the spec implies, with its shape (validated against the files)."""
    h, hd = spec.hidden_size, spec.head_dim
    q_out, kv_out = spec.num_heads * hd, spec.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (q_out, h), f"{p}.self_attn.k_proj.weight": (kv_out, h),
            f"{p}.self_attn.v_proj.weight": (kv_out, h), f"{p}.self_attn.o_proj.weight": (h, q_out),
        }
        if spec.qkv_bias:
            shapes |= {f"{p}.self_attn.q_proj.bias": (q_out,), f"{p}.self_attn.k_proj.bias": (kv_out,),
                       f"{p}.self_attn.v_proj.bias": (kv_out,)}
        if spec.o_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (h,)
        if spec.qk_norm == "head":
            shapes |= {f"{p}.self_attn.q_norm.weight": (hd,), f"{p}.self_attn.k_norm.weight": (hd,)}
        elif spec.qk_norm == "full":
            shapes |= {f"{p}.self_attn.q_norm.weight": (q_out,), f"{p}.self_attn.k_norm.weight": (kv_out,)}
        if spec.moe_layers[i]:
            shapes[family.router_name(i)] = (spec.num_experts, h)
            if spec.shared_expert_intermediate_size:
                s = spec.shared_expert_intermediate_size
                shapes |= {f"{p}.mlp.shared_expert.gate_proj.weight": (s, h), f"{p}.mlp.shared_expert.up_proj.weight": (s, h),
                           f"{p}.mlp.shared_expert.down_proj.weight": (h, s), f"{p}.mlp.shared_expert_gate.weight": (1, h)}
        else:
            d = spec.dense_intermediate_size
            shapes |= {f"{p}.mlp.gate_proj.weight": (d, h), f"{p}.mlp.up_proj.weight": (d, h),
                       f"{p}.mlp.down_proj.weight": (h, d)}
    return shapes


def plan_checkpoint(name_or_path: str | Path) -> CheckpointPlan:
    """Resolve, read and validate a checkpoint: every header, every expected tensor's shape, experts included."""
    path = ckpt.resolve_model_dir(name_or_path)
    cfg = ckpt.read_config(path)
    family = family_for_config(cfg)
    tensors = ckpt.index_tensors(path)
    try:
        spec = family.spec_from_config(cfg, _checkpoint_dtype(cfg, tensors))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'} lacks or mis-types a field ({e})", "fix or re-download config.json") from None
    dense = {name: ckpt.check_tensor(tensors, name, shape) for name, shape in _dense_shapes(spec, family).items()}
    h, i = spec.hidden_size, spec.expert_intermediate_size
    experts = {}
    for layer in range(spec.num_layers):
        if not spec.moe_layers[layer]:
            continue
        for e in range(spec.num_experts):
            gate, up, down = family.expert_tensor_names(layer, e)
            experts[(layer, e)] = (ckpt.check_tensor(tensors, gate, (i, h)), ckpt.check_tensor(tensors, up, (i, h)),
                                   ckpt.check_tensor(tensors, down, (h, i)))
    return CheckpointPlan(path, spec, family, tensors, dense, experts)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was asked for but CUDA is not available here",
                          "use --device cpu (or auto), or install a CUDA build of torch")
    return torch.device(name)


class _TensorLoader:
    """Loads tensors through safetensors' memory map, one open handle per file."""

    def __init__(self) -> None:
        self._handles: dict[Path, object] = {}

    def __call__(self, info: ckpt.TensorInfo) -> torch.Tensor:
        if info.path not in self._handles:
            self._handles[info.path] = safe_open(str(info.path), framework="pt", device="cpu")
        try:
            return self._handles[info.path].get_tensor(info.name)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for corrupt data
            raise CheckpointError(f"cannot read tensor {info.name!r} from {info.path} ({e})", "re-download the file") from None


def _build_layers(plan: CheckpointPlan, get: Callable[[str], torch.Tensor]) -> list[LayerWeights]:
    spec, family = plan.spec, plan.family
    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        opt = lambda name: get(name) if name in plan.dense else None  # noqa: E731
        mlp = (lambda pre: tuple(get(f"{pre}.{n}_proj.weight") for n in ("gate", "up", "down")))  # noqa: E731
        moe = spec.moe_layers[i]
        layers.append(LayerWeights(
            input_norm=get(f"{p}.input_layernorm.weight"), post_norm=get(f"{p}.post_attention_layernorm.weight"),
            q=get(f"{p}.self_attn.q_proj.weight"), k=get(f"{p}.self_attn.k_proj.weight"),
            v=get(f"{p}.self_attn.v_proj.weight"), o=get(f"{p}.self_attn.o_proj.weight"),
            q_bias=opt(f"{p}.self_attn.q_proj.bias"), k_bias=opt(f"{p}.self_attn.k_proj.bias"),
            v_bias=opt(f"{p}.self_attn.v_proj.bias"), o_bias=opt(f"{p}.self_attn.o_proj.bias"),
            q_norm=opt(f"{p}.self_attn.q_norm.weight"), k_norm=opt(f"{p}.self_attn.k_norm.weight"),
            router=get(family.router_name(i)) if moe else None,
            dense_mlp=None if moe else mlp(f"{p}.mlp"),
            shared_mlp=mlp(f"{p}.mlp.shared_expert") if moe and spec.shared_expert_intermediate_size else None,
            shared_gate=opt(f"{p}.mlp.shared_expert_gate.weight") if moe else None,
        ))
    return layers


class OffloadModel:
    """A loaded checkpoint: generate() in the transformers habit, plus tokenizer, stats and the cache."""

    def __init__(self, plan: CheckpointPlan, model: MoEModel, runtime: RuntimeConfig, tokenizer, generation_config: dict):
        self.plan = plan
        self.spec = plan.spec
        self.model = model
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.generation_config = generation_config

    @property
    def stats(self) -> Stats:
        return self.model.stats

    @property
    def cache(self) -> ExpertCache:
        return self.model.cache

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of a full forward pass (no KV cache): [batch, seq, vocab]."""
        ids = input_ids.to(self.device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device)
        position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return self.model.forward(ids, mask, position)

    def _default(self, value, key: str, fallback):
        return value if value is not None else self.generation_config.get(key, fallback)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        streamer=None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """[batch, prompt] (left-padded) -> [batch, prompt + new]; unset options come from generation_config.json."""
        eos = self._default(eos_token_id, "eos_token_id", list(self.spec.eos_token_ids) or None)
        return _generate(
            self.model, input_ids, attention_mask,
            max_new_tokens=self._default(max_new_tokens, "max_new_tokens", 20),
            do_sample=bool(self._default(do_sample, "do_sample", False)),
            temperature=float(self._default(temperature, "temperature", 1.0)),
            top_k=int(self._default(top_k, "top_k", 50)),
            top_p=float(self._default(top_p, "top_p", 1.0)),
            eos_token_id=eos,
            pad_token_id=self._default(pad_token_id, "pad_token_id", self.spec.pad_token_id),
            streamer=streamer, generator=generator,
        )

    def encode(self, text: str) -> torch.Tensor:
        """Text -> [1, tokens] ids with the checkpoint's tokenizer."""
        if self.tokenizer is None:
            raise ConfigError(f"{self.plan.path} has no tokenizer.json", "pass token ids to generate() instead of text")
        ids = self.tokenizer.encode(text).ids
        if not ids:
            raise ConfigError("the prompt encodes to no tokens", "give a non-empty prompt")
        return torch.tensor([ids], dtype=torch.long)

    def generate_many(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int | None = None,
        batch_size: int = 8,
        scheduler: str = "fifo",
        max_wait: int = 4,
        pool_size: int = 0,
        prefill_chunk: int = 0,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
        on_finish: Callable | None = None,
    ) -> list:
        """Continuous batching over many prompts (texts or token ids); Completions in the prompts' order.

        ``scheduler="expert-aware"`` picks each step's batch to need few distinct experts; a
        request's tokens are the same under every scheduler, batch size and budget.
        """
        from .batch import BatchConfig, generate_many

        config = BatchConfig(batch_size=batch_size, scheduler=scheduler, max_wait=max_wait, pool_size=pool_size,
                             prefill_chunk=prefill_chunk)
        ids = [self.encode(p)[0].tolist() if isinstance(p, str) else list(p) for p in prompts]
        eos = self._default(eos_token_id, "eos_token_id", list(self.spec.eos_token_ids))
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        out = generate_many(self.model, ids, config, max_new_tokens=self._default(max_new_tokens, "max_new_tokens", 20),
                            eos_token_ids=eos, do_sample=bool(self._default(do_sample, "do_sample", False)),
                            temperature=float(self._default(temperature, "temperature", 1.0)),
                            top_p=float(self._default(top_p, "top_p", 1.0)), generator=generator,
                            on_finish=on_finish)
        for c, p in zip(out, prompts):
            if isinstance(p, str):
                c.prompt = p
            if self.tokenizer is not None:
                c.text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        return out

    def generate_text(self, prompt: str, **kwargs) -> str:
        """One line from text to text: the continuation of ``prompt`` (without the prompt)."""
        ids = self.encode(prompt)
        out = self.generate(ids, **kwargs)
        return self.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def from_pretrained(
    name_or_path: str | Path,
    *,
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    expert_budget: int | str = "100%",
    offload_to: str = "disk",
    policy: str = "lru",
    predictor: str = "none",
    lookahead: int = 1,
    prefetch_budget: int | str = "50%",
    predictor_options: dict | None = None,
    progress: ProgressFn | None = None,
) -> OffloadModel:
    """Load a checkpoint with a bounded expert cache.

    ``expert_budget``: slots across all layers (int), a share of all experts ("25%") or a size
    ("6GiB"). ``offload_to``: where experts live when not cached ("disk": read on demand from the
    safetensors files; "ram": packed in host memory). ``policy``: eviction policy name.
    ``predictor``: a predictors registry name (or "none") whose guesses for the next ``lookahead``
    MoE layers are loaded in the background, holding at most ``prefetch_budget`` slots (a number,
    or a share of the cache) before use; ``predictor_options`` go to its constructor (e.g.
    ``{"weights": "predictor.safetensors"}``; ``learned`` defaults to the checkpoint folder's
    predictor.safetensors when there is one, as tiny-moe ships). Prefetching never changes the output tokens.
    """
    runtime = RuntimeConfig(device=device, dtype=parse_dtype(dtype), expert_budget=expert_budget,
                            offload_to=offload_to, policy=policy, predictor=predictor, lookahead=lookahead,
                            prefetch_budget=prefetch_budget)
    eviction = make_policy(runtime.policy)  # fail on bad names before reading gigabytes
    if runtime.predictor != "none":
        _check_predictor_name(runtime.predictor)
    dev = resolve_device(runtime.device)
    plan = plan_checkpoint(name_or_path)
    spec = plan.spec
    compute_dtype = runtime.dtype or spec.checkpoint_dtype
    slot_layout = packed_layout(spec.hidden_size, spec.expert_intermediate_size, compute_dtype)
    loader = _TensorLoader()
    if runtime.offload_to == "disk":
        store = DiskExpertStore(plan.experts, DirectReader())
    else:
        _check_ram_fits(plan, compute_dtype)
        store = RamExpertStore(plan.experts, loader, spec.hidden_size, spec.expert_intermediate_size, compute_dtype,
                               pin=dev.type == "cuda",
                               progress=(lambda d, t: progress("experts", d, t)) if progress else None)
    slot_nbytes = max(slot_layout.nbytes, store.raw_nbytes)
    num_slots = parse_budget(runtime.expert_budget, spec.total_experts, slot_nbytes)
    prefetch_slots = parse_prefetch_budget(runtime.prefetch_budget, num_slots)
    stats = Stats()
    cache = ExpertCache(store, num_slots, slot_layout, dev, eviction, stats, async_loads=runtime.predictor != "none")

    dense: dict[str, torch.Tensor] = {}
    for n, (name, info) in enumerate(plan.dense.items()):
        dense[name] = loader(info).to(device=dev, dtype=compute_dtype)
        if progress:
            progress("dense", n + 1, len(plan.dense))
    embed = dense["model.embed_tokens.weight"]
    model = MoEModel(spec, plan.family, embed, _build_layers(plan, dense.__getitem__), dense["model.norm.weight"],
                     dense.get("lm_head.weight", embed), cache, stats)
    if runtime.predictor != "none":
        model.prefetcher = _make_prefetcher(model, runtime, prefetch_slots, predictor_options or {}, plan.path)
    tokenizer = None
    if (plan.path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(plan.path / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions for bad files
            raise CheckpointError(f"{plan.path / 'tokenizer.json'} cannot be read ({e})", "re-download it") from None
    generation_config = ckpt.read_json_if_present(plan.path / "generation_config.json")
    log.info("loaded %s: %d of %d experts fit the cache (%s tier, %s)", plan.path, num_slots, spec.total_experts,
             runtime.offload_to, runtime.policy)
    return OffloadModel(plan, model, runtime, tokenizer, generation_config)


def _check_predictor_name(name: str) -> None:
    from predictors import PREDICTORS

    if name.lower() not in PREDICTORS:
        raise ConfigError(f"unknown predictor {name!r}", f"use one of: none, {', '.join(sorted(PREDICTORS))}")


def _make_prefetcher(model: MoEModel, runtime: RuntimeConfig, slots: int, options: dict, folder: Path):
    """The runtime's predictor and its prefetcher: pregate gets the routers and the norms in front of
    them, learned the checkpoint folder's predictor.safetensors unless given weights."""
    from predictors import MoEShape, make_predictor

    from .prefetch import PrefetchConfig, Prefetcher

    spec = model.spec
    moe_layers = [i for i, moe in enumerate(spec.moe_layers) if moe]
    shape = MoEShape(len(moe_layers), spec.num_experts, spec.top_k)
    if runtime.predictor.lower() == "pregate":
        options = {"routers": [model.layers[i].router for i in moe_layers],
                   "norms": [model.layers[i].post_norm for i in moe_layers], "eps": spec.rms_norm_eps, **options}
    elif runtime.predictor.lower() == "learned" and not {"weights", "net"} & options.keys() \
            and (folder / PREDICTOR_FILE).is_file():
        options = {**options, "weights": folder / PREDICTOR_FILE}
    predictor = make_predictor(runtime.predictor, shape, **options)
    return Prefetcher(predictor, model.cache, model.stats, moe_layers, PrefetchConfig(runtime.lookahead, slots))


def _check_ram_fits(plan: CheckpointPlan, dtype: torch.dtype) -> None:
    need = plan.spec.total_experts * plan.expert_nbytes(dtype)
    have = host_memory().available
    if need > have:
        raise OffloadError(f"--offload-to ram needs {need / 2**30:.1f} GiB for the experts but {have / 2**30:.1f} GiB is free",
                           "use --offload-to disk")


__all__ = ["OffloadModel", "from_pretrained", "plan_checkpoint", "resolve_device", "gpu_memories", "host_memory"]
