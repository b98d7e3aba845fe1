"""Attention variants behind a registry, and the pieces they share: RMSNorm, RoPE, masks.

A family adapter names its attention (``Family.attention``); each variant declares the tensors it
needs (names relative to the layer's ``self_attn.`` prefix, with shapes from the spec), so the
checkpoint reader validates and loads exactly what the forward pass uses, from one list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from .config import ModelSpec
from .kv import KVCache, KVPool
from .registry import lookup


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as the reference implementations do."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding:
    """RoPE (Su et al. 2021) with optional linear position scaling: cos/sin tables for given positions."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> None:
        dim = spec.head_dim
        self.inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        self.linear_factor = spec.rope_linear_factor
        self.dtype = dtype

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [batch, seq] -> cos, sin: [batch, 1, seq, head_dim]
        pos = position_ids.float() / self.linear_factor
        freqs = pos[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]


def attention_masks(attention_mask: torch.Tensor, q_pos: torch.Tensor,
                    windows: set[int | None]) -> dict[int | None, torch.Tensor]:
    """Boolean masks [batch, 1, seq, total] per sliding window: key is real, not in the future, inside the window.

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


class Attention(Protocol):
    """One layer's attention with its resident weights. x: [batch, seq, hidden] -> [batch, seq, hidden]."""

    def __call__(self, layer: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                 kv: KVCache | KVPool | None) -> torch.Tensor: ...


class GroupedQueryAttention:
    """Multi-head attention with shared key/value heads (GQA, Ainslie et al. 2023), RoPE, optional
    q/k/v/o biases and q/k RMSNorm per head (Qwen3) or over the whole projection (OLMoE)."""

    name: ClassVar[str] = "gqa"

    @staticmethod
    def tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """Tensor names under the layer's ``self_attn.`` prefix, with their shapes."""
        h, hd = spec.hidden_size, spec.head_dim
        q_out, kv_out = spec.num_heads * hd, spec.num_kv_heads * hd
        shapes = {"q_proj.weight": (q_out, h), "k_proj.weight": (kv_out, h), "v_proj.weight": (kv_out, h),
                  "o_proj.weight": (h, q_out)}
        if spec.qkv_bias:
            shapes |= {"q_proj.bias": (q_out,), "k_proj.bias": (kv_out,), "v_proj.bias": (kv_out,)}
        if spec.o_bias:
            shapes["o_proj.bias"] = (h,)
        if spec.qk_norm == "head":
            shapes |= {"q_norm.weight": (hd,), "k_norm.weight": (hd,)}
        elif spec.qk_norm == "full":
            shapes |= {"q_norm.weight": (q_out,), "k_norm.weight": (kv_out,)}
        return shapes

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> None:
        self.spec = spec
        get = weights.get
        self.q, self.k, self.v, self.o = (weights[f"{n}_proj.weight"] for n in "qkvo")
        self.q_bias, self.k_bias, self.v_bias, self.o_bias = (get(f"{n}_proj.bias") for n in "qkvo")
        self.q_norm, self.k_norm = get("q_norm.weight"), get("k_norm.weight")

    def _qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.spec.rms_norm_eps
        return rms_norm(q, self.q_norm, eps), rms_norm(k, self.k_norm, eps)

    def __call__(self, layer: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                 kv: KVCache | KVPool | None) -> torch.Tensor:
        spec = self.spec
        b, t, _ = x.shape
        q, k, v = F.linear(x, self.q, self.q_bias), F.linear(x, self.k, self.k_bias), F.linear(x, self.v, self.v_bias)
        if spec.qk_norm == "full":  # OLMoE normalises the whole projection before splitting heads
            q, k = self._qk_norm(q, k)
        q, k = q.view(b, t, -1, spec.head_dim), k.view(b, t, -1, spec.head_dim)
        if spec.qk_norm == "head":  # Qwen3 normalises each head
            q, k = self._qk_norm(q, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)          # [b, heads, t, head_dim]
        v = v.view(b, t, -1, spec.head_dim).transpose(1, 2)
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv is not None:
            k, v = kv.update(layer, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=spec.head_dim**-0.5, enable_gqa=spec.num_kv_heads != spec.num_heads
        )
        return F.linear(out.transpose(1, 2).reshape(b, t, -1), self.o, self.o_bias)


ATTENTIONS: dict[str, type[GroupedQueryAttention]] = {cls.name: cls for cls in (GroupedQueryAttention,)}


def attention_class(name: str) -> type[GroupedQueryAttention]:
    return lookup(ATTENTIONS, name, "attention")
