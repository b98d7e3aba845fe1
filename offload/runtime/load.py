"""from_pretrained(): checkpoint -> validated plan -> resident dense weights + expert cache -> OffloadModel.

The path of one token: the CLI (cli/main.py) or the caller builds a RuntimeConfig and calls
``from_pretrained``; ``OffloadModel.generate`` (runtime/generate.py) runs prefill and decode steps of
``MoEModel.forward`` (model/forward.py); each MoE layer routes, asks the ExpertCache (memory/cache.py) for its
experts, whose mover (memory/transfer.py) brings misses in from the disk or RAM tier, and runs each
expert's layout-bound forward (experts/layouts.py); sampling.sample() picks the next token.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from offload.amounts import parse_budget, parse_prefetch_budget
from offload.checkpoint.locate import model_name, read_json_if_present
from offload.checkpoint.plan import CheckpointPlan, plan_checkpoint
from offload.checkpoint.vocab import load_tokenizer
from offload.errors import BudgetError, ConfigError, DeviceError
from offload.experts.kernels.pool import use_threads
from offload.experts.kernels.warmup import warm
from offload.experts.layouts import SlotLayout
from offload.hw.calibration import Calibration
from offload.memory.budget import Placement, fit_budget, is_auto, memory_plan
from offload.memory.cache import ExpertCache
from offload.memory.hostcompute import HostCompute, expert_cost_model
from offload.memory.patterns import GENERIC, ModelIdentity, Patterns, load_patterns, parse_prune
from offload.memory.policies import make_policy
from offload.memory.prefetch import PrefetchConfig, Prefetcher
from offload.memory.retrieval import TaskRetrieval, prune
from offload.memory.transfer import (
    DirectReader,
    DiskExpertStore,
    ExpertStore,
    HostLayoutOf,
    RamExpertStore,
    slot_nbytes,
)
from offload.model.forward import MoEModel
from offload.runtime.assemble import ProgressFn, build_model, kept_in_blocks
from offload.runtime.batch import BatchConfig, Completion, generate_many
from offload.runtime.config import RuntimeConfig
from offload.runtime.generate import generate as _generate
from offload.runtime.sampling import SamplingConfig
from offload.stats import Stats
from predictors import PREDICTORS, MoEShape

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was asked for but CUDA is not available here",
                          "use --device cpu (or auto), or install a CUDA build of torch")
    return torch.device(name)


class OffloadModel:
    """A loaded checkpoint: generate() in the transformers habit, plus tokenizer, stats and the cache."""

    def __init__(self, plan: CheckpointPlan, model: MoEModel, runtime: RuntimeConfig, tokenizer,
                 generation_config: dict) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.model = model
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.generation_config = generation_config

    def close(self) -> None:
        """Stop the cache's loader and close the checkpoint files (``with from_pretrained(...) as m:`` does it)."""
        self.model.cache.close()

    def __enter__(self) -> OffloadModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def name(self) -> str:
        """The checkpoint's name (a bundled model's, a folder's, or a hub repo id): what traces and patterns record."""
        return model_name(self.plan.path)

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

    def sampling_config(self, sampling: SamplingConfig | None = None, **options: Any) -> SamplingConfig:
        """``sampling`` (or generation_config.json's defaults) with transformers-named ``options`` on top.

        Options: max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id, seed;
        None means "not given".
        """
        if sampling is None:
            return SamplingConfig.from_generation_config(self.generation_config, self.spec.eos_token_ids,
                                                         self.spec.pad_token_id, **options)
        given = {("eos_token_ids" if k == "eos_token_id" else k): v for k, v in options.items() if v is not None}
        return dataclasses.replace(sampling, **given)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 sampling: SamplingConfig | None = None, streamer=None, generator: torch.Generator | None = None,
                 **options: Any) -> torch.Tensor:
        """[batch, prompt] (left-padded) -> [batch, prompt + new]; see ``sampling_config`` for ``options``."""
        return _generate(self.model, input_ids, attention_mask, self.sampling_config(sampling, **options),
                         streamer=streamer, generator=generator)

    def encode(self, text: str) -> torch.Tensor:
        """Text -> [1, tokens] ids with the checkpoint's tokenizer."""
        if self.tokenizer is None:
            raise ConfigError(f"{self.plan.path} has no tokenizer.json (nor a GGUF-embedded tokenizer)",
                              "pass token ids to generate() instead of text")
        ids = self.tokenizer.encode(text).ids
        if not ids:
            raise ConfigError("the prompt encodes to no tokens", "give a non-empty prompt")
        return torch.tensor([ids], dtype=torch.long)

    def batch_config(self, **options: Any) -> BatchConfig:
        """BatchConfig from the runtime's scheduler, batch size and max wait, with ``options`` on top."""
        defaults = {"batch_size": self.runtime.batch_size, "scheduler": self.runtime.scheduler,
                    "max_wait": self.runtime.max_wait}
        return BatchConfig(**{**defaults, **{k: v for k, v in options.items() if v is not None}})

    def generate_many(self, prompts: Sequence[str | Sequence[int]], sampling: SamplingConfig | None = None,
                      generator: torch.Generator | None = None, on_finish: Callable | None = None,
                      **options: Any) -> list[Completion]:
        """Continuous batching over many prompts (texts or token ids); Completions in the prompts' order.

        ``options`` are BatchConfig fields (batch_size, scheduler, max_wait, pool_size, prefill_chunk)
        and sampling options. ``scheduler="expert-aware"`` picks each step's batch to need few distinct
        experts; a request's tokens are the same under every scheduler, batch size and budget.
        """

        batch_names = {f.name for f in dataclasses.fields(BatchConfig)}
        config = self.batch_config(**{k: v for k, v in options.items() if k in batch_names})
        sampling = self.sampling_config(sampling, **{k: v for k, v in options.items() if k not in batch_names})
        ids = [self.encode(p)[0].tolist() if isinstance(p, str) else list(p) for p in prompts]
        out = generate_many(self.model, ids, config, sampling, generator=generator, on_finish=on_finish)
        for c, p in zip(out, prompts, strict=True):
            if isinstance(p, str):
                c.prompt = p
            if self.tokenizer is not None:
                c.text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        return out

    def generate_text(self, prompt: str, **options: Any) -> str:
        """One line from text to text: the continuation of ``prompt`` (without the prompt)."""
        ids = self.encode(prompt)
        out = self.generate(ids, **options)
        return self.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def _runtime_config(runtime: RuntimeConfig | None, overrides: dict[str, Any]) -> RuntimeConfig:
    unknown = sorted(set(overrides) - set(RuntimeConfig.field_names()))
    if unknown:
        raise ConfigError(f"unknown runtime option {unknown[0]!r}",
                          f"use one of: {', '.join(RuntimeConfig.field_names())}")
    return dataclasses.replace(runtime or RuntimeConfig(), **overrides)


def from_pretrained(name_or_path: str | Path, runtime: RuntimeConfig | None = None, *,
                    progress: ProgressFn | None = None, **overrides: Any) -> OffloadModel:
    """Load a checkpoint with a bounded expert cache.

    ``runtime`` (a RuntimeConfig) and ``overrides`` (its fields by name, e.g. ``expert_budget="25%"``,
    ``offload_to="ram"``, ``policy="lfu"``, ``predictor="pregate"``) say how; every name and budget
    is validated before any file is read. ``expert_budget``: slots across all layers (int), a share
    of all experts ("25%") or a size ("6GiB"). ``offload_to``: where experts live when not cached
    ("disk": read on demand from the safetensors files; "ram": packed in host memory). A predictor
    loads its guesses for the next ``lookahead`` MoE layers in the background, holding at most
    ``prefetch_budget`` slots; ``predictor_options`` go to it (``learned`` defaults to the checkpoint
    folder's predictor.safetensors, as tiny-moe ships). Prefetching never changes the output tokens.
    ``patterns`` (a file of `offload profile`) matches each request's prompt to a task and warm-starts the cache
    with its experts (lossless); ``prune`` keeps only the task's (``task``, else generic) top experts per layer
    and routes among them (lossy).
    """
    runtime = _runtime_config(runtime, overrides)
    device = resolve_device(runtime.device)
    use_threads(runtime.threads)
    if device.type == "cpu":
        warm()  # the kernels load (or compile, once per install) now, not inside the first token
    plan = plan_checkpoint(name_or_path)
    patterns = _read_patterns(plan, runtime)  # refused now if they belong to another checkpoint
    compute_dtype = runtime.dtype or plan.spec.checkpoint_dtype
    runtime = fit_runtime_budget(plan, runtime, compute_dtype, device)  # auto -> slots; does it fit?
    plan = dataclasses.replace(plan, expert_format=plan.expert_format.for_activations(runtime.quant_activations))
    slot_layout = plan.expert_format.slot_layout(plan.spec, compute_dtype, device, runtime.quant_activations)
    stats = Stats()
    host = plan.host_layout(compute_dtype, device, runtime.quant_activations)
    store = _make_store(plan, runtime, host, device, progress)
    cache = _make_cache(plan, runtime, store, slot_layout, device, stats)
    # a GGUF file's lm_head and attention projections compute from their blocks where its experts do (int8 on the CPU)
    blocks = kept_in_blocks(plan) if device.type == "cpu" and runtime.quant_activations == "int8" else set()
    model = build_model(plan, cache, stats, compute_dtype, device, progress, blocks)
    if runtime.predictor != "none" and _can_prefetch(model, runtime):
        model.prefetcher = _make_prefetcher(model, runtime, plan.path)
    if runtime.hybrid != "off":
        model.host_compute = _make_host_compute(plan, runtime, store, compute_dtype, device, stats)
    if patterns is not None:
        model.request_hook = _make_retrieval(model, runtime, patterns)
    tokenizer = load_tokenizer(plan.path, plan.metadata)
    generation_config = read_json_if_present(plan.path / "generation_config.json")
    log.info("loaded %s: %d of %d experts fit the cache (%s tier, %s)", plan.path, cache.num_slots,
             plan.spec.total_experts, runtime.offload_to, runtime.policy)
    return OffloadModel(plan, model, runtime, tokenizer, generation_config)


def placement(plan: CheckpointPlan, runtime: RuntimeConfig, dtype: torch.dtype, device: torch.device) -> Placement:
    """What the fit check needs of a runtime config: device, dtypes, tier, and the KV cache's context and rows
    (the batching pool of ``batch_size``, which run, serve and chat all keep)."""
    return Placement(device, dtype, runtime.offload_to, runtime.quant_activations, runtime.context,
                     BatchConfig(batch_size=runtime.batch_size).pool)


def fit_runtime_budget(plan: CheckpointPlan, runtime: RuntimeConfig, dtype: torch.dtype,
                       device: torch.device) -> RuntimeConfig:
    """``runtime`` with an ``auto`` budget replaced by the slots that fit (memory/budget.py); an explicit budget
    is checked to fit. Runs after the headers are read and before any weight is."""
    mp = memory_plan(plan, placement(plan, runtime, dtype, device))
    if runtime.prune is not None:
        return dataclasses.replace(runtime, expert_budget=_fit_pruned(plan, runtime, mp))
    slots = fit_budget(runtime.expert_budget, mp, plan.spec.architecture)
    if not is_auto(runtime.expert_budget):
        return runtime
    log.info("expert budget auto: %d of %d experts (%s)", slots, plan.spec.total_experts, mp.describe())
    return dataclasses.replace(runtime, expert_budget=slots)


def _fit_pruned(plan: CheckpointPlan, runtime: RuntimeConfig, mp) -> int:
    """Pruning's slots: the experts it keeps, every layer's; the budget must hold them and so must this machine."""
    spec = plan.spec
    needed = parse_prune(runtime.prune, spec.num_experts, spec.top_k) * spec.num_moe_layers
    if not is_auto(runtime.expert_budget):
        budget = parse_budget(runtime.expert_budget, spec.total_experts, mp.slot_nbytes)
        if budget < needed:
            raise BudgetError(f"--prune {runtime.prune} keeps {needed} experts, more than the expert budget "
                              f"{runtime.expert_budget!r} ({budget} slots) holds",
                              "lower --prune, or raise --expert-budget (auto: what fits this machine)")
    return fit_budget(needed, mp, spec.architecture)


def identity(plan: CheckpointPlan) -> ModelIdentity:
    """What a patterns file must have been measured on to serve this checkpoint."""
    spec = plan.spec
    return ModelIdentity(model_name(plan.path), spec.architecture,
                         tuple(i for i, moe in enumerate(spec.moe_layers) if moe), spec.num_experts, spec.top_k)


def _read_patterns(plan: CheckpointPlan, runtime: RuntimeConfig) -> Patterns | None:
    if runtime.patterns is None:
        return None
    patterns = load_patterns(runtime.patterns)
    patterns.model.check(identity(plan), str(runtime.patterns))
    if runtime.task is not None:
        patterns.task(runtime.task)
    return patterns


def _make_retrieval(model: MoEModel, runtime: RuntimeConfig, patterns: Patterns) -> TaskRetrieval:
    """The request hook: pruning first (its experts loaded once, then no warm start is needed), then per request
    the match and the priors for the policy and the prefetcher's predictor."""
    if runtime.prune is not None:
        keep = parse_prune(runtime.prune, model.spec.num_experts, model.spec.top_k)
        prune(model, patterns.task(runtime.task or GENERIC), keep)
    predictor = getattr(model.prefetcher, "predictor", None)
    return TaskRetrieval(patterns, model.cache, model.stats, model.moe_layers, runtime.task,
                         warm=runtime.prune is None, predictor=predictor)


def _make_store(plan: CheckpointPlan, runtime: RuntimeConfig, host: HostLayoutOf, device: torch.device,
                progress: ProgressFn | None) -> ExpertStore:
    """The slow tier: the checkpoint on disk, or every expert read once into RAM in its ``host`` layout."""
    disk = DiskExpertStore(plan.experts, DirectReader(), plan.source_layout)
    if runtime.offload_to == "disk":
        return disk
    report = (lambda d, t: progress("experts", d, t)) if progress else None
    return RamExpertStore(disk, list(plan.experts), host, pin=device.type == "cuda", progress=report)


def _make_cache(plan: CheckpointPlan, runtime: RuntimeConfig, store: ExpertStore, slot_layout: SlotLayout,
                device: torch.device, stats: Stats) -> ExpertCache:
    spec = plan.spec
    num_slots = parse_budget(runtime.expert_budget, spec.total_experts, slot_nbytes(store, slot_layout, device))
    layers = [i for i, moe in enumerate(spec.moe_layers) if moe]  # decode's layer cycle, for layer-aware policies
    return ExpertCache(store, num_slots, slot_layout, device, make_policy(runtime.policy), stats,
                       async_loads=runtime.predictor != "none", layers=layers)


def _can_prefetch(model: MoEModel, runtime: RuntimeConfig) -> bool:
    """Whether a prefetch could ever find a slot: one outside the experts the current layer uses (its top-k at
    batch 1), within the prefetch budget. If not, the predictor would only cost time: say so once and run none."""
    slots, top_k = model.cache.num_slots, model.spec.top_k
    budget = parse_prefetch_budget(runtime.prefetch_budget, slots)
    if slots > top_k and budget > 0:
        return True
    why = (f"the cache's {slots} slots are all needed by one layer's top-{top_k} experts (give --expert-budget more "
           f"than {top_k} slots)" if slots <= top_k else
           f"--prefetch-budget {runtime.prefetch_budget} leaves no slot to prefetch into")
    log.warning("prefetching is off for --predictor %s: %s", runtime.predictor, why)
    return False


def _make_prefetcher(model: MoEModel, runtime: RuntimeConfig, folder: Path):
    """The runtime's predictor, built through its registry entry's from_model hook, and its prefetcher."""

    spec = model.spec
    shape = MoEShape(spec.num_moe_layers, spec.num_experts, spec.top_k)
    options = dict(runtime.predictor_options or {})
    predictor = PREDICTORS[runtime.predictor.lower()].from_model(model, shape, folder, **options)
    slots = parse_prefetch_budget(runtime.prefetch_budget, model.cache.num_slots)
    return Prefetcher(predictor, model.cache, model.stats, model.moe_layers, PrefetchConfig(runtime.lookahead, slots))


def _make_host_compute(plan: CheckpointPlan, runtime: RuntimeConfig, store: ExpertStore, dtype: torch.dtype,
                       device: torch.device, stats: Stats):
    """The hybrid CPU branch: the cost model (this machine's `offload bench-hw` calibration) over the host copy."""

    costs = expert_cost_model(plan, Calibration.load(), device.type, runtime.offload_to, dtype,
                                      runtime.quant_activations)
    return HostCompute(store, costs, runtime.hybrid, stats.hybrid)



__all__ = ["OffloadModel", "from_pretrained", "plan_checkpoint", "resolve_device"]
