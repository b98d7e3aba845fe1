"""Rotary position embeddings (Su et al. 2021): the inverse frequencies of each scaling (default,
linear, YaRN), cos/sin tables for given positions, and the rotation of q and k.

YaRN (Peng et al. 2023) interpolates low frequencies and keeps high ones, blended by a linear ramp
between two correction dims, and scales cos/sin by an attention factor; the formulas are
transformers' ``_compute_yarn_parameters``, which the parity tests compare against.
"""

from __future__ import annotations

import math

import torch

from offload.experts.kernels import dense
from offload.spec import RopeSpec


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(rope: RopeSpec) -> float:
    """The factor YaRN multiplies cos and sin by."""
    if rope.attention_factor:
        return rope.attention_factor
    if rope.mscale and rope.mscale_all_dim:
        return _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
    return _yarn_mscale(rope.factor)


def softmax_scale_factor(rope: RopeSpec) -> float:
    """DeepSeek's YaRN also scales the attention logits by mscale(factor, mscale_all_dim)^2 (1 otherwise)."""
    if rope.kind == "yarn" and rope.mscale_all_dim:
        return _yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return 1.0


def _yarn_inv_freq(rope: RopeSpec, dim: int) -> torch.Tensor:
    base, factor = rope.theta, rope.factor

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoids a division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _proportional_inv_freq(rope: RopeSpec, dim: int) -> torch.Tensor:
    """Gemma-4's "proportional" RoPE over a whole head of ``dim``: the first proportion x dim / 2 frequencies are the
    default ones (exponents over the whole head), the rest 0, so those dims pass unrotated."""
    angles = int(rope.proportion * dim // 2)
    freq = 1.0 / (rope.theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.float32) / dim))
    return torch.cat((freq, torch.zeros(dim // 2 - angles))) / rope.factor


def inv_freq(rope: RopeSpec, dim: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim / 2], cos/sin scale) of a rotation over ``dim`` dims."""
    if rope.kind == "yarn":
        return _yarn_inv_freq(rope, dim), yarn_attention_factor(rope)
    if rope.kind == "proportional":
        return _proportional_inv_freq(rope, dim), 1.0
    freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return (freq / rope.factor if rope.kind == "linear" else freq), 1.0


class RotaryEmbedding:
    """cos/sin tables for given positions: [batch, 1, seq, dim] each (the frequencies repeated twice)."""

    def __init__(self, rope: RopeSpec, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        freq, self.scale = inv_freq(rope, dim)
        self.inv_freq = freq.to(device)
        self.dtype = dtype

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [batch, seq] -> cos, sin: [batch, 1, seq, dim]
        freqs = position_ids.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.scale, emb.sin() * self.scale
        return cos.to(self.dtype)[:, None], sin.to(self.dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [..., head_dim] (the rest pass through: partial rotary).

    ``interleave``: DeepSeek's pairs (x0, x1), (x2, x3) ..., whose output lists the rotated even dims,
    then the odd ones, exactly as transformers' ``apply_rotary_pos_emb_interleave`` (q and k alike, so
    their dot products are those of the interleaved rotation).
    """
    if not interleave and dense.rope_runs(x, cos, sin):  # a decode step: one compiled call, the same bits
        return dense.rope(x, cos, sin)
    dim = cos.shape[-1]
    rot, rest = (x, None) if dim == x.shape[-1] else (x[..., :dim], x[..., dim:])
    if interleave:
        c, s = cos[..., : dim // 2], sin[..., : dim // 2]
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    else:
        out = rot * cos + rotate_half(rot) * sin
    return out if rest is None else torch.cat((out, rest), dim=-1)
