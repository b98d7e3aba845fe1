"""The forward pass: embeddings, RMSNorm, RoPE, grouped-query attention with a KV cache, and MoE
blocks whose experts come from the expert cache. Dense weights stay resident; experts do not.
Family differences live in ModelSpec and families.py, not in branches here.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .cache import ExpertCache
from .config import ModelSpec
from .experts import expert_forward
from .families import Family
from .stats import Stats

if TYPE_CHECKING:
    from .prefetch import Prefetcher

# Called after each MoE layer routes: (layer, expert ids [tokens, k], weights [tokens, k]).
RouteObserver = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class LayerWeights:
    """Resident (dense) weights of one decoder layer."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    router: torch.Tensor | None = None                               # [experts, hidden] on MoE layers
    dense_mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # dense layers
    shared_mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # Qwen2-MoE shared expert
    shared_gate: torch.Tensor | None = None                          # [1, hidden]


class KVCache:
    """Preallocated keys and values for every layer: [batch, kv_heads, capacity, head_dim].

    All rows share one length (a left-padded batch); KVPool below gives each row its own.
    """

    def __init__(self, spec: ModelSpec, batch: int, capacity: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, spec.num_kv_heads, capacity, spec.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.length = 0  # tokens already stored

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def fresh(self) -> torch.Tensor:
        """[batch] bool: rows whose sequence starts with this step."""
        return torch.full((self.k[0].shape[0],), self.length == 0)

    def slots(self) -> torch.Tensor:
        """Identity of each batch row across steps (the prefetcher keys per-sequence history by it)."""
        return torch.arange(self.k[0].shape[0])

    def storage_positions(self, seq: int) -> torch.Tensor:
        """[1, seq] index in storage of this step's tokens (the same for every row)."""
        return torch.arange(self.length, self.length + seq, device=self.k[0].device)[None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, seq: int) -> None:
        self.length += seq


class KVPool:
    """Keys and values of many sequences, one row each with its own length (continuous batching).

    A step runs over a subset of rows (``select``); each row's tokens are stored from its own
    length on, so requests that joined at different times decode in one batch without padding.
    """

    def __init__(self, spec: ModelSpec, rows: int, capacity: int, dtype: torch.dtype, device: torch.device):
        shape = (rows, spec.num_kv_heads, capacity, spec.head_dim)
        # Zeros, not empty: a short row attends over the batch's longest key range, and its masked
        # keys must hold finite numbers (uninitialised memory can hold NaN, and NaN * 0 is NaN).
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.rows = torch.arange(0)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def select(self, rows: torch.Tensor) -> None:
        """The next forward step runs over these rows (in this order)."""
        self.rows = rows.to(self.lengths.device)

    def fresh(self) -> torch.Tensor:
        return self.lengths[self.rows] == 0

    def reset(self, row: int) -> None:
        """Row ``row`` starts a new sequence."""
        self.lengths[row] = 0

    def slots(self) -> torch.Tensor:
        return self.rows

    def storage_positions(self, seq: int) -> torch.Tensor:
        """[rows, seq] index in storage of this step's tokens: each row continues at its own length."""
        return self.lengths[self.rows][:, None] + torch.arange(seq, device=self.lengths.device)

    def attention_mask(self, seq: int) -> torch.Tensor:
        """[rows, total]: a row sees its own stored tokens and this step's."""
        ends = self.lengths[self.rows] + seq
        return (torch.arange(int(ends.max()), device=ends.device)[None] < ends[:, None]).long()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [rows, kv_heads, seq, head_dim] -> stored at each row's positions
        pos = self.storage_positions(k.shape[2])                      # [rows, seq]
        rows = self.rows[:, None].expand_as(pos)
        self.k[layer][rows, :, pos] = k.transpose(1, 2)                # indexed view: [rows, seq, heads, dim]
        self.v[layer][rows, :, pos] = v.transpose(1, 2)
        end = int(pos.max()) + 1
        return self.k[layer][self.rows, :, :end], self.v[layer][self.rows, :, :end]

    def advance(self, seq: int) -> None:
        self.lengths[self.rows] += seq


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as the reference implementations do."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class MoEModel:
    """A decoder-only MoE transformer whose experts are served by an ExpertCache."""

    def __init__(
        self,
        spec: ModelSpec,
        family: Family,
        embed: torch.Tensor,
        layers: list[LayerWeights],
        final_norm: torch.Tensor,
        lm_head: torch.Tensor,
        cache: ExpertCache,
        stats: Stats,
    ) -> None:
        self.spec = spec
        self.family = family
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.cache = cache
        self.stats = stats
        self.route_observers: list[RouteObserver] = []
        self.prefetcher: Prefetcher | None = None  # set by from_pretrained when a predictor is chosen
        self.device = embed.device
        self.dtype = embed.dtype
        dim = spec.head_dim
        self.inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=self.device) / dim))

    # -- pieces ----------------------------------------------------------------------------
    def _rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [batch, seq] -> cos, sin: [batch, 1, seq, head_dim]
        pos = position_ids.float() / self.spec.rope_linear_factor
        freqs = pos[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]

    @staticmethod
    def _masks(attention_mask: torch.Tensor, q_pos: torch.Tensor, windows: set[int | None]) -> dict[int | None, torch.Tensor]:
        """Boolean masks [batch, 1, seq, total]: key is real, not in the future, inside the window.

        ``q_pos`` [batch or 1, seq] is where each query sits in storage. Each query may always see
        itself, so rows of padding never become all-masked (NaN).
        """
        total = attention_mask.shape[1]
        q = q_pos[:, None, :, None]                                       # [b, 1, seq, 1]
        k_pos = torch.arange(total, device=attention_mask.device)
        base = attention_mask[:, None, None, :].bool() & (k_pos <= q)
        masks = {}
        for window in windows:
            allowed = base if window is None else base & (k_pos > q - window)
            masks[window] = allowed | (k_pos == q)
        return masks

    def _attention(self, lw: LayerWeights, layer: int, x: torch.Tensor, cos, sin, mask, kv: KVCache | None):
        spec = self.spec
        b, t, _ = x.shape
        q = F.linear(x, lw.q, lw.q_bias)
        k = F.linear(x, lw.k, lw.k_bias)
        v = F.linear(x, lw.v, lw.v_bias)
        if spec.qk_norm == "full":  # OLMoE normalises the whole projection before splitting heads
            q, k = rms_norm(q, lw.q_norm, spec.rms_norm_eps), rms_norm(k, lw.k_norm, spec.rms_norm_eps)
        q = q.view(b, t, -1, spec.head_dim)
        k = k.view(b, t, -1, spec.head_dim)
        if spec.qk_norm == "head":  # Qwen3 normalises each head
            q, k = rms_norm(q, lw.q_norm, spec.rms_norm_eps), rms_norm(k, lw.k_norm, spec.rms_norm_eps)
        q, k = q.transpose(1, 2), k.transpose(1, 2)          # [b, heads, t, head_dim]
        v = v.view(b, t, -1, spec.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv is not None:
            k, v = kv.update(layer, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=spec.head_dim**-0.5, enable_gqa=spec.num_kv_heads != spec.num_heads
        )
        return F.linear(out.transpose(1, 2).reshape(b, t, -1), lw.o, lw.o_bias)

    def _route(self, lw: LayerWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router softmax (float32) -> top-k -> the family's renormalisation. x: [tokens, hidden]."""
        logits = F.linear(x, lw.router)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, experts = torch.topk(probs, self.spec.top_k, dim=-1)
        if self.spec.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.family.router_weights_fp32:
            weights = weights.to(logits.dtype)
        return experts, weights

    def _moe(self, layer: int, lw: LayerWeights, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Route tokens, run each needed expert once over its tokens, then sum each token's top-k.

        Each weighted expert output lands in its own cell of a [tokens, top_k, hidden] buffer (in
        the promoted dtype, float32 for float32 routing weights) and the top-k are summed in slot
        order, as transformers' grouped experts path does. The result is therefore bit-identical
        whatever order the cache delivers experts in, i.e. for every budget, policy and predictor.
        """
        experts, weights = self._route(lw, x)  # [tokens, k]
        for observer in self.route_observers:
            observer(layer, experts, weights)
        needed = experts.unique(sorted=True).tolist()
        hits = [e for e in needed if (layer, e) in self.cache]
        order = deque(hits + [e for e in needed if (layer, e) not in self.cache])
        buf = x.new_empty((*experts.shape, x.shape[-1]), dtype=torch.promote_types(x.dtype, weights.dtype))
        held: deque[int] = deque()

        def reserve() -> None:
            # Take every expert the cache can give without evicting one in use; with async loads
            # (or CUDA) their loads are queued at once and overlap the compute of those already here.
            while order and self.cache.can_acquire((layer, order[0])):
                held.append(order.popleft())
                self.cache.reserve((layer, held[-1]))

        reserve()
        if self.prefetcher is not None:
            self.prefetcher.after_route(layer, experts, residual)
        layer_stats = self.stats.layer(layer)
        layer_stats.steps += 1
        layer_stats.distinct_experts += len(needed)
        while held:
            e = held.popleft()
            gate, up, down = self.cache.wait((layer, e))
            start = time.perf_counter()
            rows, slot = torch.where(experts == e)  # [n] each: token index, its top-k position
            buf[rows, slot] = expert_forward(x[rows], gate, up, down) * weights[rows, slot, None]
            layer_stats.compute_time_s += time.perf_counter() - start
            self.cache.release((layer, e))
            reserve()
        result = buf.sum(dim=1).to(x.dtype)
        if lw.shared_mlp is not None:
            shared = expert_forward(x, *lw.shared_mlp)
            result = result + torch.sigmoid(F.linear(x, lw.shared_gate)) * shared
        return result

    def _mlp(self, layer: int, lw: LayerWeights, x: torch.Tensor, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # x: [batch, seq, hidden] (normed), h: the residual stream; valid: [batch, seq]
        # (padding never routes, so never loads experts)
        if lw.dense_mlp is not None:
            return expert_forward(x, *lw.dense_mlp)
        flat, residual = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
        mask = valid.reshape(-1)
        if bool(mask.all()):
            return self._moe(layer, lw, flat, residual).view_as(x)
        out = torch.zeros_like(flat)
        out[mask] = self._moe(layer, lw, flat[mask], residual[mask])
        return out.view_as(x)

    # -- whole model -----------------------------------------------------------------------
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
        spec = self.spec
        seq = input_ids.shape[1]
        h = F.embedding(input_ids, self.embed)
        cos, sin = self._rope(position_ids)
        q_pos = kv.storage_positions(seq) if kv is not None else torch.arange(seq, device=h.device)[None]
        masks = self._masks(attention_mask, q_pos, set(spec.sliding_windows))
        valid = torch.ones_like(input_ids, dtype=torch.bool) if isinstance(kv, KVPool) else attention_mask[:, -seq:].bool()
        if self.prefetcher is not None:
            if kv is None:
                self.prefetcher.begin_step(valid, torch.arange(len(valid)), torch.ones(len(valid), dtype=torch.bool))
            else:
                self.prefetcher.begin_step(valid, kv.slots(), kv.fresh())
        for i, lw in enumerate(self.layers):
            x = rms_norm(h, lw.input_norm, spec.rms_norm_eps)
            h = h + self._attention(lw, i, x, cos, sin, masks[spec.sliding_windows[i]], kv)
            x = rms_norm(h, lw.post_norm, spec.rms_norm_eps)
            h = h + self._mlp(i, lw, x, h, valid)
        if self.prefetcher is not None:
            self.prefetcher.end_step()
        if kv is not None:
            kv.advance(seq)
        if last_only:
            h = h[:, -1:]
        return F.linear(rms_norm(h, self.final_norm, spec.rms_norm_eps), self.lm_head)
