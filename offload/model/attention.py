"""Attention variants behind a registry, and the pieces they share: RMSNorm, RoPE, masks.

A family adapter names the attention of each layer type (``Family.attention``, ``Family.attention_by_type``);
each variant declares the tensors it needs (names relative to its module, ``self_attn.`` or ``linear_attn.``,
with shapes from the spec), so the checkpoint reader validates and loads exactly what the forward pass uses,
from one list; and what it keeps per sequence (``store``: keys and values per token, or a fixed-size state),
so the KV structures and the fit check allocate and count exactly that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from offload.experts.kernels import dense
from offload.experts.kernels.linear import float_linear
from offload.model.deltanet import GatedDeltaNet, GroupedGatedDeltaNet
from offload.model.kv import KVCache, KVPool, LayerStore
from offload.model.rope import apply_rope, softmax_scale_factor
from offload.registry import lookup
from offload.spec import ModelSpec, RopeSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as the reference implementations do (a decode step's few rows in
    one compiled call, kernels/dense.py)."""
    if dense.rms_norm_runs(x, weight):
        return dense.rms_norm(x, weight, eps)
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


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
    """One layer's attention with its resident weights. x: [batch, seq, hidden] -> [batch, seq, hidden].

    ``mask`` is what its ``masking`` names: "causal", the boolean [batch, 1, seq, total] mask of the layer's
    window; "padding", the real tokens [batch, seq]. ``rope`` (cos, sin) is None for a piece without RoPE.
    """

    module: ClassVar[str]   # the module its tensors sit under in a decoder layer
    masking: ClassVar[str]
    norms: ClassVar[tuple[str, ...]]  # its RMSNorm weights (which a family may store zero-centred)

    @staticmethod
    def rotary(spec: ModelSpec) -> tuple[RopeSpec, int] | None: ...  # its RoPE and rotated dims (None: no RoPE)

    @staticmethod
    def store(spec: ModelSpec) -> LayerStore: ...

    def __call__(self, layer: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                 mask: torch.Tensor, kv: KVCache | KVPool | None) -> torch.Tensor: ...


DECODE_QUERIES = 16  # attention calls with at most this many queries compute in float32 on the CPU (sdpa)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
         gqa: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention, computed in float32 for a decode step's few queries on the CPU.

    torch's CPU attention in bf16 / f16 for one query costs 5-10x its float32 run on the same values (2-core EPYC,
    16 query heads x 64, 4 KV heads: 0.95 ms against 0.18 ms at 512 keys, 3.7 against 0.57 ms at 2048, the casts
    included), while from ~32 queries up (prefill) the half kernel is as fast or faster. The float32 run reads the
    half values exactly and rounds its output once to q.dtype, as the half kernel, accumulating in float32, does.
    """
    if q.dtype in (torch.bfloat16, torch.float16) and q.device.type == "cpu" and q.shape[-2] <= DECODE_QUERIES:
        mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                             enable_gqa=gqa)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _sdpa_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                     scale: float, gqa: bool) -> torch.Tensor:
    """Attention whose softmax also sees one learned logit per head (gpt-oss's sinks), dropped after it.

    The sink is an extra key of zeros (so q.k = 0) whose additive mask is the sink logit and whose value
    is zero: the fused kernel then computes exactly softmax([scores, sink])[:-1] @ v.
    """
    b, heads, t, _ = q.shape
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    bias = bias.expand(b, heads, t, mask.shape[-1])
    sink = sinks.to(q.dtype).view(1, heads, 1, 1).expand(b, heads, t, 1)
    zero_k = k.new_zeros((*k.shape[:2], 1, k.shape[-1]))
    zero_v = v.new_zeros((*v.shape[:2], 1, v.shape[-1]))
    return sdpa(q, torch.cat((k, zero_k), 2), torch.cat((v, zero_v), 2), torch.cat((bias, sink), -1), scale, gqa)


class GroupedQueryAttention:
    """Multi-head attention with shared key/value heads (GQA, Ainslie et al. 2023), RoPE, optional
    q/k/v/o biases and q/k RMSNorm per head (Qwen3) or over the whole projection (OLMoE)."""

    name: ClassVar[str] = "gqa"
    # projections used only through float_linear: a GGUF file's may stay in their blocks (runtime/assemble.py)
    block_weights: ClassVar[tuple[str, ...]] = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
    module: ClassVar[str] = "self_attn"
    masking: ClassVar[str] = "causal"
    norms: ClassVar[tuple[str, ...]] = ("q_norm.weight", "k_norm.weight")
    query_rows: ClassVar[int] = 1  # q_proj's rows per query dim (the gated variant adds a gate per head)

    @staticmethod
    def dims(spec: ModelSpec) -> tuple[int, int]:
        """(head dim, kv heads) of this piece's layers."""
        return spec.head_dim, spec.num_kv_heads

    @classmethod
    def rotary(cls, spec: ModelSpec) -> tuple[RopeSpec, int] | None:
        """The RoPE its layers use and the dims it rotates (None: none)."""
        return spec.rope, spec.rope.dim or cls.dims(spec)[0]

    @classmethod
    def store(cls, spec: ModelSpec) -> LayerStore:
        head_dim, kv_heads = cls.dims(spec)
        return LayerStore(((kv_heads, head_dim), (kv_heads, head_dim)))

    @classmethod
    def tensors(cls, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """Tensor names under the layer's ``self_attn.`` prefix, with their shapes."""
        h, (hd, kv_heads) = spec.hidden_size, cls.dims(spec)
        q_out, kv_out = spec.num_heads * hd, kv_heads * hd
        shapes = {"q_proj.weight": (cls.query_rows * q_out, h), "k_proj.weight": (kv_out, h),
                  "v_proj.weight": (kv_out, h), "o_proj.weight": (h, q_out)}
        if spec.qkv_bias:
            shapes |= {"q_proj.bias": (cls.query_rows * q_out,), "k_proj.bias": (kv_out,), "v_proj.bias": (kv_out,)}
        if spec.o_bias:
            shapes["o_proj.bias"] = (h,)
        if spec.qk_norm == "head":
            shapes |= {"q_norm.weight": (hd,), "k_norm.weight": (hd,)}
        elif spec.qk_norm == "full":
            shapes |= {"q_norm.weight": (q_out,), "k_norm.weight": (kv_out,)}
        if spec.attention_sinks:
            shapes["sinks"] = (spec.num_heads,)
        return shapes

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> None:
        self.spec = spec
        get = weights.get
        self.q, self.k, self.o = (weights[f"{n}_proj.weight"] for n in "qko")
        self.v = get("v_proj.weight")
        self.q_bias, self.k_bias, self.v_bias, self.o_bias = (get(f"{n}_proj.bias") for n in "qkvo")
        self.q_norm, self.k_norm = get("q_norm.weight"), get("k_norm.weight")
        self.sinks = get("sinks")
        self.head_dim = self.dims(spec)[0]
        self.scale = self.head_dim**-0.5
        self.interleave = self.rotary(spec)[0].interleave

    def _qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.spec.rms_norm_eps
        return rms_norm(q, self.q_norm, eps), rms_norm(k, self.k_norm, eps)

    def _queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[b, t, heads * head_dim] queries, and the output gate (None: ungated)."""
        return float_linear(x, self.q, self.q_bias), None

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v [b, heads, t, head_dim] before RoPE, and the output gate (or None)."""
        spec, hd = self.spec, self.head_dim
        b, t, _ = x.shape
        (q, gate), k, v = self._queries(x), float_linear(x, self.k, self.k_bias), float_linear(x, self.v, self.v_bias)
        if spec.qk_norm == "full":  # OLMoE normalises the whole projection before splitting heads
            q, k = self._qk_norm(q, k)
        q, k = q.view(b, t, -1, hd), k.view(b, t, -1, hd)
        if spec.qk_norm == "head":  # Qwen3 normalises each head
            q, k = self._qk_norm(q, k)
        return q.transpose(1, 2), k.transpose(1, 2), v.view(b, t, -1, hd).transpose(1, 2), gate

    def __call__(self, layer: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                 kv: KVCache | KVPool | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v, gate = self._project(x)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin, self.interleave), apply_rope(k, cos, sin, self.interleave)
        if kv is not None:
            k, v = kv.update(layer, k, v)
        gqa = k.shape[1] != q.shape[1]
        if self.sinks is None:
            out = sdpa(q, k, v, mask, self.scale, gqa)
        else:
            out = _sdpa_with_sinks(q, k, v, mask, self.sinks, self.scale, gqa)
        out = out.transpose(1, 2).reshape(b, t, -1)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return float_linear(out, self.o, self.o_bias)


class GatedAttention(GroupedQueryAttention):
    """GQA with an output gate (Qwen3-Next, Qwen3.5; Qiu et al. 2025, "Gated Attention for Large Language
    Models"): q_proj emits each head's query and a gate of the same width side by side, and the attention
    output is multiplied by sigmoid(gate) before o_proj."""

    name: ClassVar[str] = "gated-full"
    query_rows: ClassVar[int] = 2

    def _queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q, gate = float_linear(x, self.q, self.q_bias).view(b, t, self.spec.num_heads, -1).chunk(2, dim=-1)
        return q.reshape(b, t, -1), gate.reshape(b, t, -1)


def _unit_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a scale (Gemma-4's value norm), in float32 and cast back."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class GemmaAttention(GroupedQueryAttention):
    """Gemma-4's sliding-window layers: per-head RMSNorm of q and k (scaled) and of v (unscaled), and an attention
    scale of 1, the norms having set the logits' size."""

    name: ClassVar[str] = "gemma-sliding"

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__(spec, weights)
        self.scale = 1.0

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hd, eps = self.head_dim, self.spec.rms_norm_eps
        b, t, _ = x.shape
        k = float_linear(x, self.k, self.k_bias).view(b, t, -1, hd)
        v = k if self.v is None else float_linear(x, self.v, self.v_bias).view(b, t, -1, hd)  # keys as values
        q = rms_norm(float_linear(x, self.q, self.q_bias).view(b, t, -1, hd), self.q_norm, eps)
        k, v = rms_norm(k, self.k_norm, eps), _unit_rms_norm(v, eps)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None


class GemmaGlobalAttention(GemmaAttention):
    """Gemma-4's full-attention layers: their own head dim, kv heads and RoPE (proportional: a quarter of the
    frequencies rotate), and, with attention_k_eq_v, no v_proj: the keys before their norm are the values."""

    name: ClassVar[str] = "gemma-global"

    @staticmethod
    def dims(spec: ModelSpec) -> tuple[int, int]:
        return spec.global_head_dim or spec.head_dim, spec.global_num_kv_heads or spec.num_kv_heads

    @classmethod
    def rotary(cls, spec: ModelSpec) -> tuple[RopeSpec, int] | None:
        rope = spec.global_rope or spec.rope
        return rope, rope.dim or cls.dims(spec)[0]

    @classmethod
    def tensors(cls, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        shapes = super().tensors(spec)
        if spec.attention_k_eq_v:
            shapes.pop("v_proj.weight")
            shapes.pop("v_proj.bias", None)
        return shapes


class MultiHeadLatentAttention:
    """Multi-head Latent Attention (DeepSeek-V2, 2024): keys and values come from one compressed latent per
    token (kv_lora_rank wide) plus one rotary key shared by all heads (qk_rope_head_dim wide), and that
    pair is all the KV cache stores: 61 x (512 + 64) x 2 bytes = 70 KiB per token for DeepSeek-V3 in bf16,
    where per-head keys and values would take 61 x 128 x (192 + 128) x 2 = 4.8 MiB. Queries optionally
    go through a low-rank bottleneck too (q_lora_rank). The latents' norms use eps 1e-6, as transformers'
    DeepSeek code does (not config.rms_norm_eps).
    """

    name: ClassVar[str] = "mla"
    module: ClassVar[str] = "self_attn"
    masking: ClassVar[str] = "causal"
    norms: ClassVar[tuple[str, ...]] = ("q_a_layernorm.weight", "kv_a_layernorm.weight")
    LATENT_EPS = 1e-6

    @staticmethod
    def rotary(spec: ModelSpec) -> tuple[RopeSpec, int] | None:
        return spec.rope, spec.qk_rope_head_dim

    @staticmethod
    def store(spec: ModelSpec) -> LayerStore:
        return LayerStore(((1, spec.kv_lora_rank), (1, spec.qk_rope_head_dim)))

    @staticmethod
    def tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        h, heads, rank, rope = spec.hidden_size, spec.num_heads, spec.kv_lora_rank, spec.qk_rope_head_dim
        qk = spec.qk_nope_head_dim + rope
        if spec.q_lora_rank:
            r = spec.q_lora_rank
            shapes = {"q_a_proj.weight": (r, h), "q_a_layernorm.weight": (r,), "q_b_proj.weight": (heads * qk, r)}
        else:
            shapes = {"q_proj.weight": (heads * qk, h)}
        shapes |= {"kv_a_proj_with_mqa.weight": (rank + rope, h), "kv_a_layernorm.weight": (rank,),
                   "kv_b_proj.weight": (heads * (spec.qk_nope_head_dim + spec.v_head_dim), rank),
                   "o_proj.weight": (h, heads * spec.v_head_dim)}
        if spec.qkv_bias:  # attention_bias: the two down-projections and o_proj
            shapes |= {"kv_a_proj_with_mqa.bias": (rank + rope,), "o_proj.bias": (h,)}
            if spec.q_lora_rank:
                shapes["q_a_proj.bias"] = (spec.q_lora_rank,)
        return shapes

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> None:
        self.spec, self.w = spec, dict(weights)
        self.scale = (spec.qk_nope_head_dim + spec.qk_rope_head_dim) ** -0.5 * softmax_scale_factor(spec.rope)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        if "q_proj.weight" in w:
            return float_linear(x, w["q_proj.weight"])
        latent = float_linear(x, w["q_a_proj.weight"], w.get("q_a_proj.bias"))
        return float_linear(rms_norm(latent, w["q_a_layernorm.weight"], self.LATENT_EPS), w["q_b_proj.weight"])

    def _latents(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores: the normed latent [b, 1, t, rank] and the rotated shared key [b, 1, t, rot]."""
        spec, w = self.spec, self.w
        b, t, _ = x.shape
        rank, rot = spec.kv_lora_rank, spec.qk_rope_head_dim
        compressed = float_linear(x, w["kv_a_proj_with_mqa.weight"], w.get("kv_a_proj_with_mqa.bias"))
        latent, k_rot = compressed.split([rank, rot], -1)
        latent = rms_norm(latent, w["kv_a_layernorm.weight"], self.LATENT_EPS).view(b, 1, t, rank)
        return latent, apply_rope(k_rot.view(b, 1, t, rot), *rope, spec.rope.interleave)

    def __call__(self, layer: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                 kv: KVCache | KVPool | None) -> torch.Tensor:
        spec, w = self.spec, self.w
        b, t, _ = x.shape
        nope, rot, heads = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.num_heads
        q = self._queries(x).view(b, t, heads, nope + rot).transpose(1, 2)  # [b, heads, t, qk]
        q_pass, q_rot = q.split([nope, rot], dim=-1)
        q_rot = apply_rope(q_rot, *rope, spec.rope.interleave)
        latent, k_rot = self._latents(x, rope)
        if kv is not None:
            latent, k_rot = kv.update(layer, latent, k_rot)  # [b, 1, T, rank], [b, 1, T, rot]
        total = latent.shape[2]
        kv_heads = float_linear(latent[:, 0], w["kv_b_proj.weight"]).view(b, total, heads, nope + spec.v_head_dim)
        k_nope, v = kv_heads.transpose(1, 2).split([nope, spec.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rot.expand(b, heads, total, rot)), dim=-1)
        out = sdpa(torch.cat((q_pass, q_rot), -1), k, v, mask, self.scale)
        return float_linear(out.transpose(1, 2).reshape(b, t, -1), w["o_proj.weight"], w.get("o_proj.bias"))



ATTENTIONS: dict[str, type] = {cls.name: cls for cls in (GroupedQueryAttention, GatedAttention, GemmaAttention,
                                                          GemmaGlobalAttention, MultiHeadLatentAttention,
                                                          GatedDeltaNet, GroupedGatedDeltaNet)}


def attention_class(name: str) -> type:
    return lookup(ATTENTIONS, name, "attention")
