"""The forward pass: embeddings, decoder layers made of the family's attention / router / activation
pieces, and MoE blocks whose experts come from an expert source. Dense weights stay resident;
experts do not. Family differences live in ModelSpec and the pieces, not in branches here.

The model layer sits below the memory hierarchy: what it needs from the expert cache, the prefetcher, the
hybrid CPU branch and task patterns is written here as small protocols (ExpertSource, StepHook, HostBranch,
RequestHook), which offload/memory/ implements, so the forward never imports the layers that serve it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from offload.experts.activations import Activation, make_activation
from offload.experts.kernels import moe
from offload.experts.kernels.linear import float_linear
from offload.experts.kernels.moe import FusedExperts
from offload.experts.kernels.pool import decode_step
from offload.experts.layouts import Expert, Key
from offload.model.attention import Attention, attention_masks, rms_norm
from offload.model.kv import KVCache, KVPool
from offload.model.rope import RotaryEmbedding
from offload.model.routers import Router
from offload.spec import ModelSpec
from offload.stats import Stats

# Called after each MoE layer routes: (layer, expert ids [tokens, k], weights [tokens, k]).
RouteObserver = Callable[[int, torch.Tensor, torch.Tensor], None]


class LayerStep(Protocol):
    """One MoE layer step's experts, pinned while handed out (a context manager)."""

    def __iter__(self) -> Iterator[tuple[int, Expert]]: ...  # one at a time

    def batches(self) -> Iterator[list[tuple[int, Expert]]]: ...  # as many at a time as have landed


class ExpertSource(Protocol):
    """Where a MoE block's experts come from (the expert cache, memory/cache.py)."""

    def __contains__(self, key: Key) -> bool: ...  # resident now (a hit)

    def step(self, layer: int, needed: list[int]) -> AbstractContextManager[LayerStep]:
        """One layer step: yields (expert id, Expert) for every id in ``needed``, each usable until the next;
        leaving its ``with`` block, however, releases what it holds."""
        ...

    def check(self) -> None:
        """Raise unless the bookkeeping is consistent and nothing is held between steps."""
        ...


class StepHook(Protocol):
    """Told where a forward step is, so it can load experts ahead of use (the prefetcher, memory/prefetch.py)."""

    def begin_step(self, valid: torch.Tensor, slots: torch.Tensor, fresh: torch.Tensor) -> None: ...

    def after_route(self, layer: int, experts: torch.Tensor, hidden: torch.Tensor) -> None: ...

    def end_step(self) -> None: ...


class RequestHook(Protocol):
    """Told when a request's prompt has routed, before its decode (task patterns, memory/retrieval.py)."""

    def prefilled(self, routes: Any, running: Iterable[Key] = ()) -> Any:
        """``routes`` [prompt tokens, MoE layers, top_k] expert ids; ``running``: keys other requests still use."""
        ...


class RouteCollector:
    """A route observer that keeps the last forward step's experts per MoE layer."""

    def __init__(self) -> None:
        self.layers: list[torch.Tensor] = []

    def __call__(self, layer: int, experts: torch.Tensor, weights: torch.Tensor) -> None:
        self.layers.append(experts)

    def take(self) -> Any:
        """[tokens, moe layers, top_k] numpy expert ids of the step just run."""
        out = torch.stack(self.layers, dim=1).numpy(force=True)
        self.layers.clear()
        return out


class HostBranch(Protocol):
    """Computes a missed expert from its host copy instead of fetching it (hybrid, memory/hostcompute.py)."""

    def wants(self, tokens: int) -> bool: ...

    def run(self, key: Key, x: torch.Tensor, activation: Activation) -> torch.Tensor: ...


@dataclass
class DecoderLayer:
    """One decoder layer's resident pieces: norms, attention, and a router (MoE) or a dense MLP.

    A layer computes h += attention(input_norm(h)); h += mlp(post_norm(h)). Gemma-4's "sandwich" layers also
    normalise the attention's and the MLP block's outputs, run a dense MLP beside the experts (each branch with
    its own norms, summed), and scale the layer's output; those norms are None elsewhere.
    """

    input_norm: torch.Tensor
    post_norm: torch.Tensor                 # before the MLP / MoE block
    attention: Attention
    router: Router | None = None            # MoE layers
    dense_mlp: Expert | None = None         # dense layers; in a MoE layer, a dense MLP beside the experts (Gemma-4)
    shared_mlp: Expert | None = None        # shared experts (Qwen2-MoE, DeepSeek, GLM) ...
    shared_gate: torch.Tensor | None = None      # ... and, for Qwen2-MoE, their sigmoid gate [1, hidden]
    attention_out_norm: torch.Tensor | None = None  # Gemma-4: on the attention's output
    mlp_out_norm: torch.Tensor | None = None        # Gemma-4: on the MLP block's output
    dense_out_norm: torch.Tensor | None = None      # Gemma-4: on the dense MLP's output, beside the experts
    moe_norm: torch.Tensor | None = None            # Gemma-4: the experts' own input norm (of the residual stream)
    moe_out_norm: torch.Tensor | None = None        # Gemma-4: on the experts' weighted sum
    layer_scale: torch.Tensor | None = None         # Gemma-4: the layer's output times a learned scalar [1]

    def router_input(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """What the router scores: the MoE block's normed input ``x``, or the residual stream ``h`` (a router
        that normalises it itself, Gemma-4's)."""
        return h if self.router.reads_residual else x


def _norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return x if weight is None else rms_norm(x, weight, eps)


class MoEModel:
    """A decoder-only MoE transformer whose experts are served by an ExpertCache."""

    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list[DecoderLayer], final_norm: torch.Tensor,
                 lm_head: torch.Tensor, cache: ExpertSource, stats: Stats, activation: str = "swiglu") -> None:
        self.spec = spec
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.cache = cache
        self.stats = stats
        self.activation: Activation = make_activation(activation, spec)
        self.activation_name = activation
        self.fused = FusedExperts()  # one kernel-pool call per layer step at decode on the CPU (kernels/moe.py)
        self.route_observers: list[RouteObserver] = []
        self.prefetcher: StepHook | None = None  # set by from_pretrained when a predictor is chosen
        self.host_compute: HostBranch | None = None  # set by from_pretrained with --hybrid auto|always
        self.request_hook: RequestHook | None = None  # set by from_pretrained with --patterns
        self.device = embed.device
        self.dtype = embed.dtype
        self.layer_stores = [lw.attention.store(spec) for lw in layers]  # what a KV cache keeps per layer
        # Each layer's RoPE table, by (RopeSpec, rotated dims): None for linear attention, and Gemma-4's full layers
        # have their own; and its mask: the causal mask of its sliding window, or the real-token mask for pieces
        # that only need to know the padding.
        self.rope_keys = [lw.attention.rotary(spec) for lw in layers]
        self.ropes = {key: RotaryEmbedding(*key, self.dtype, self.device) for key in set(self.rope_keys) if key}
        self.mask_keys: list[int | str | None] = [
            "padding" if lw.attention.masking == "padding" else spec.sliding_windows[i] for i, lw in enumerate(layers)]

    @property
    def moe_layers(self) -> list[int]:
        """Model layer index of each MoE layer, in order."""
        return [i for i, moe in enumerate(self.spec.moe_layers) if moe]

    # -- the MoE block ---------------------------------------------------------------------
    def _moe(self, layer: int, lw: DecoderLayer, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Route tokens, run each needed expert once over its tokens, then sum each token's top-k.

        Each weighted expert output lands in its own cell of a [tokens, top_k, hidden] buffer (in
        the promoted dtype, float32 for float32 routing weights) and the top-k are summed in slot
        order, as transformers' grouped experts path does. The result is therefore bit-identical
        whatever order the cache delivers experts in, i.e. for every budget, policy and predictor.
        """
        routed = lw.router_input(x, residual)
        experts, weights = lw.router.select(routed)  # [tokens, k]
        if lw.router.dropped is not None:  # pruned: count the routing weight the dropped experts would have had
            layer_stats = self.stats.layer(layer)
            layer_stats.pruned_tokens += len(x)
            layer_stats.pruned_mass += float(lw.router.dropped_share(routed).sum())
        for observer in self.route_observers:
            observer(layer, experts, weights)
        buf = x.new_empty((*experts.shape, x.shape[-1]), dtype=torch.promote_types(x.dtype, weights.dtype))
        # decode on the CPU: the step's rows sorted by expert once, for one fused kernel call per batch of experts
        routes = moe.routes(x, experts, weights, self.spec.num_experts) if moe.applies(
            x, buf, self.activation_name) else None
        needed = routes.needed() if routes is not None else experts.unique(sorted=True).tolist()
        self._run_experts(layer, needed, experts, weights, x, buf, residual, routes)
        result = buf.sum(dim=1).to(x.dtype)
        if lw.shared_mlp is not None:
            shared = self.activation(lw.shared_mlp, x)
            gate = torch.sigmoid(float_linear(x, lw.shared_gate)) if lw.shared_gate is not None else 1.0
            result = result + gate * shared
        return result

    def _run_experts(self, layer: int, needed: list[int], experts: torch.Tensor, weights: torch.Tensor,
                     x: torch.Tensor, buf: torch.Tensor, residual: torch.Tensor, routes: moe.Routes | None) -> None:
        """Resident experts first while missing ones load; each writes its tokens' cells of ``buf``."""
        distinct = len(needed)
        if self.host_compute is not None:
            misses = [e for e in needed if (layer, e) not in self.cache]
            on_host = set(misses) - set(self._host_misses(layer, misses, experts, weights, x, buf))
            needed = [e for e in needed if e not in on_host]
        layer_stats = self.stats.layer(layer)
        layer_stats.steps += 1
        layer_stats.distinct_experts += distinct
        # pins every expert that fits and queues the missing ones' loads; the pins go however the block ends
        with self.cache.step(layer, needed) as step:
            if self.prefetcher is not None:
                self.prefetcher.after_route(layer, experts, residual)
            for batch in (step.batches() if routes is not None else ([pair] for pair in step)):
                start = time.perf_counter()
                self._compute(batch, routes, experts, weights, x, buf)
                layer_stats.compute_time_s += time.perf_counter() - start

    def _compute(self, batch: list[tuple[int, Expert]], routes: moe.Routes | None, experts: torch.Tensor,
                 weights: torch.Tensor, x: torch.Tensor, buf: torch.Tensor) -> None:
        """Each expert of ``batch`` into its tokens' cells of ``buf``: those with kernels in one fused call, the
        others one by one (each cell is written once, so the sum is the same either way)."""
        fused = [(e, expert.jobs) for e, expert in batch if routes is not None and expert.jobs is not None]
        if fused:
            ids, halves = zip(*fused, strict=True)
            self.fused.run(routes, ids, halves, buf, self.activation_name)
        for e, expert in batch:
            if routes is None or expert.jobs is None:
                rows, slot = torch.where(experts == e)  # [n] each: token index, its top-k position
                buf[rows, slot] = self.activation(expert, x[rows]) * weights[rows, slot, None]

    def _host_misses(self, layer: int, misses: list[int], experts: torch.Tensor, weights: torch.Tensor,
                     x: torch.Tensor, buf: torch.Tensor) -> list[int]:
        """Compute the misses the cost model sends to the CPU from their host copies; return the rest (to fetch).

        Each writes its own cells of ``buf``, so the sum stays in expert order whichever way an expert ran.
        """
        fetch = []
        for e in misses:
            rows, slot = torch.where(experts == e)
            if self.host_compute.wants(len(rows)):
                out = self.host_compute.run((layer, e), x[rows], self.activation)
                buf[rows, slot] = out * weights[rows, slot, None]
            else:
                fetch.append(e)
        return fetch

    def _mlp(self, layer: int, lw: DecoderLayer, x: torch.Tensor, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # x: [batch, seq, hidden] (normed), h: the residual stream; valid: [batch, seq]
        if lw.router is None:
            return self.activation(lw.dense_mlp, x)
        eps = self.spec.rms_norm_eps
        moe_x = x if lw.moe_norm is None else rms_norm(h, lw.moe_norm, eps)  # Gemma-4: the experts' own norm
        routed = self._routed(layer, lw, moe_x, h, valid)
        if lw.dense_mlp is None:
            return routed
        dense = _norm(self.activation(lw.dense_mlp, x), lw.dense_out_norm, eps)  # Gemma-4: both branches, summed
        return dense + _norm(routed, lw.moe_out_norm, eps)

    def _routed(self, layer: int, lw: DecoderLayer, x: torch.Tensor, h: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """The MoE block over the real tokens (padding never routes, so never loads experts)."""
        flat, residual = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
        mask = valid.reshape(-1)
        if bool(mask.all()):
            return self._moe(layer, lw, flat, residual).view_as(x)
        out = torch.zeros_like(flat)
        out[mask] = self._moe(layer, lw, flat[mask], residual[mask])
        return out.view_as(x)

    def _layer(self, i: int, lw: DecoderLayer, h: torch.Tensor, ropes: dict, masks: dict, valid: torch.Tensor,
               kv: KVCache | KVPool | None) -> torch.Tensor:
        eps = self.spec.rms_norm_eps
        out = lw.attention(i, rms_norm(h, lw.input_norm, eps), ropes.get(self.rope_keys[i]), masks[self.mask_keys[i]],
                           kv)
        h = h + _norm(out, lw.attention_out_norm, eps)
        out = self._mlp(i, lw, rms_norm(h, lw.post_norm, eps), h, valid)
        h = h + _norm(out, lw.mlp_out_norm, eps)
        return h if lw.layer_scale is None else h * lw.layer_scale

    # -- whole model -----------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[..., hidden] embeddings (Gemma-4 scales them by sqrt(hidden), rounded to the compute dtype as transformers
        does)."""
        h = F.embedding(input_ids, self.embed)
        return h if self.spec.embed_scale == 1.0 else h * torch.tensor(self.spec.embed_scale, dtype=h.dtype)

    def _begin_prefetch(self, valid: torch.Tensor, kv: KVCache | KVPool | None) -> None:
        if self.prefetcher is None:
            return
        if kv is None:
            self.prefetcher.begin_step(valid, torch.arange(len(valid)), torch.ones(len(valid), dtype=torch.bool))
        else:
            self.prefetcher.begin_step(valid, kv.slots(), kv.fresh())

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        kv: KVCache | KVPool | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids, position_ids: [batch, seq]; attention_mask: [batch, past + seq] -> logits [batch, seq|1, vocab].

        With a KVPool, ``attention_mask`` covers each row's stored tokens plus this step's (kv.attention_mask()).
        """
        with decode_step(input_ids.numel()):
            return self._forward(input_ids, attention_mask, position_ids, kv, last_only)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 kv: KVCache | KVPool | None, last_only: bool) -> torch.Tensor:
        spec = self.spec
        seq = input_ids.shape[1]
        h = self.embed_tokens(input_ids)
        ropes = {key: rope(position_ids) for key, rope in self.ropes.items()}
        q_pos = kv.storage_positions(seq) if kv is not None else torch.arange(seq, device=h.device)[None]
        valid = kv.valid(attention_mask, seq) if kv is not None else attention_mask[:, -seq:].bool()
        windows = {key for key in self.mask_keys if key != "padding"}
        masks = {**attention_masks(attention_mask, q_pos, windows), "padding": valid}
        self._begin_prefetch(valid, kv)
        for i, lw in enumerate(self.layers):
            h = self._layer(i, lw, h, ropes, masks, valid, kv)
        if self.prefetcher is not None:
            self.prefetcher.end_step()
        if kv is not None:
            kv.advance(seq)
        if last_only:
            h = h[:, -1:]
        logits = float_linear(rms_norm(h, self.final_norm, spec.rms_norm_eps), self.lm_head)
        if spec.final_logit_softcapping:  # Gemma: cap * tanh(logits / cap)
            logits = torch.tanh(logits / spec.final_logit_softcapping) * spec.final_logit_softcapping
        return logits
