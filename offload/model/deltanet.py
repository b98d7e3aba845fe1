"""Gated DeltaNet linear attention (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with
Delta Rule"): three of every four layers of Qwen3-Next and Qwen3.5/3.6-MoE.

Instead of keys and values that grow with the context, a sequence keeps a fixed-size state per layer:

- a causal depthwise conv1d over the q/k/v projection, whose state is the last ``kernel - 1`` inputs;
- a recurrent state S [value heads, key dim, value dim], updated per token by the gated delta rule
  ``S <- exp(g) S;  S <- S + k (beta (v - S^T k))^T;  o = S^T q``, with the decay g from ``A_log``, ``dt_bias``
  and the projection a, the write strength ``beta = sigmoid(b)``, and q and k L2-normalised.

Prefill runs the chunked form (chunks of 64, as the reference kernels): within a chunk the delta-rule updates are
one unit lower-triangular solve, the WY representation of Yang et al. 2024 ("Parallelizing Linear Transformers
with the Delta Rule over Sequence Length"), and the state is carried from chunk to chunk. Decode runs the
one-token recurrence. Both keep the recurrent state in float32 whatever the compute dtype: it sums a sequence's
whole history, and the reference kernels (flash-linear-attention, transformers' fallbacks) keep it in float32,
so a bfloat16 state would drift from them as the context grows. The conv state holds projections, in the
compute dtype, as the reference does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from offload.experts.kernels.linear import float_linear
from offload.model.kv import KVCache, KVPool, LayerStore
from offload.spec import ModelSpec

CHUNK = 64  # tokens per chunk of the prefill form (flash-linear-attention's and transformers' size)
L2_EPS = 1e-6  # q/k L2 normalisation epsilon of the reference kernels


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def causal_conv(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU of a causal depthwise conv1d over this step's inputs, continuing from ``state``.

    x: [b, t, channels]; state: [b, channels, kernel - 1], the inputs before this step (zeros for a new
    sequence, which is what zero padding gives a whole-sequence conv); weight: [channels, 1, kernel].
    Returns the output [b, t, channels] and the new state (the last kernel - 1 inputs).
    """
    full = torch.cat((state, x.transpose(1, 2)), dim=-1)      # [b, channels, kernel - 1 + t]
    out = F.silu(F.conv1d(full, weight, groups=weight.shape[0]))  # [b, channels, t]
    return out.transpose(1, 2), full[:, :, full.shape[-1] - state.shape[-1]:]


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                   state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the gated delta rule. q, k: [b, h, dk]; v: [b, h, dv]; g, beta: [b, h]; state [b, h, dk, dv]
    (all float32) -> output [b, h, dv], new state."""
    state = state * g.exp()[..., None, None]
    delta = (v - (k[..., None, :] @ state)[..., 0, :]) * beta[..., None]   # what the state mispredicts for k
    state = state + k[..., :, None] * delta[..., None, :]
    return (q[..., None, :] @ state)[..., 0, :], state


def chunked_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       state: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over a segment, a chunk at a time. q, k: [b, h, t, dk]; v: [b, h, t, dv]; g, beta:
    [b, h, t]; state: [b, h, dk, dv] (all float32) -> outputs [b, h, t, dv], the state after the segment.

    With gamma the cumulative log decay inside a chunk and S0 the state before it, the corrected values
    delta = (I + A)^-1 (beta v - beta exp(gamma) k S0), A[i, j] = beta_i k_i.k_j exp(gamma_i - gamma_j) for j < i,
    give every output o_i = exp(gamma_i) q_i S0 + sum_{j<=i} exp(gamma_i - gamma_j) (q_i.k_j) delta_j and the
    next state exp(gamma_C) S0 + sum_j exp(gamma_C - gamma_j) k_j delta_j^T.
    """
    b, h, t, _ = k.shape
    pad = -t % chunk  # padded steps: no key, value or write, no decay, so the state passes through them
    q, k, v = (F.pad(x, (0, 0, 0, pad)).reshape(b, h, -1, chunk, x.shape[-1]) for x in (q, k, v))
    gamma = F.pad(g, (0, pad)).reshape(b, h, -1, chunk).cumsum(-1)            # [b, h, chunks, chunk]
    beta = F.pad(beta, (0, pad)).reshape(b, h, -1, chunk, 1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # j <= i
    system = (k * beta) @ k.transpose(-1, -2) * decay  # its diagonal is ignored: the solve takes it as 1
    u = torch.linalg.solve_triangular(system, v * beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k * beta * gamma.exp()[..., None], upper=False, unitriangular=True)
    scores = q @ k.transpose(-1, -2) * decay
    q_from_state = q * gamma.exp()[..., None]
    k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]
    out = torch.empty_like(u)
    for c in range(u.shape[2]):
        delta = u[:, :, c] - w[:, :, c] @ state
        out[:, :, c] = q_from_state[:, :, c] @ state + scores[:, :, c] @ delta
        state = state * gamma[:, :, c, -1, None, None].exp() + k_to_end[:, :, c].transpose(-1, -2) @ delta
    return out.reshape(b, h, -1, out.shape[-1])[:, :, :t], state


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each head's output times SiLU(gate), rounded as transformers' RMSNormGated (norm before gate)."""
    dtype = x.dtype
    x32 = x.float()
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return (normed * F.silu(gate.float())).to(dtype)


@dataclass(frozen=True)
class _Dims:
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    kernel: int

    @classmethod
    def of(cls, spec: ModelSpec) -> _Dims:
        return cls(spec.linear_num_key_heads, spec.linear_num_value_heads, spec.linear_key_head_dim,
                   spec.linear_value_head_dim, spec.linear_conv_kernel)

    @property
    def keys(self) -> int:
        return self.key_heads * self.key_dim

    @property
    def values(self) -> int:
        return self.value_heads * self.value_dim

    @property
    def conv_channels(self) -> int:  # q, k and v go through the conv
        return 2 * self.keys + self.values


class GatedDeltaNet:
    """A Gated DeltaNet layer as Qwen3.5 names it: q|k|v, z, b and a each from their own projection."""

    name: ClassVar[str] = "gated-deltanet"
    module: ClassVar[str] = "linear_attn"
    masking: ClassVar[str] = "padding"  # takes the real-token mask [b, t]: padding must not enter the state
    norms: ClassVar[tuple[str, ...]] = ()  # its gated norm's weight is a plain scale (ones at init)

    @staticmethod
    def rotary(spec: ModelSpec) -> None:
        return None  # no positions: order enters through the conv and the recurrence

    @staticmethod
    def store(spec: ModelSpec) -> LayerStore:
        """No keys or values per token; per sequence the conv inputs and the float32 recurrent state."""
        d = _Dims.of(spec)
        return LayerStore(None, (((d.conv_channels, d.kernel - 1), None),
                                 ((d.value_heads, d.key_dim, d.value_dim), torch.float32)))

    @staticmethod
    def tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        d, h = _Dims.of(spec), spec.hidden_size
        return {"in_proj_qkv.weight": (d.conv_channels, h), "in_proj_z.weight": (d.values, h),
                "in_proj_b.weight": (d.value_heads, h), "in_proj_a.weight": (d.value_heads, h),
                **GatedDeltaNet._common(spec)}

    @staticmethod
    def _common(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        d = _Dims.of(spec)
        return {"conv1d.weight": (d.conv_channels, 1, d.kernel), "dt_bias": (d.value_heads,),
                "A_log": (d.value_heads,), "norm.weight": (d.value_dim,),
                "out_proj.weight": (spec.hidden_size, d.values)}

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> None:
        self.spec, self.d = spec, _Dims.of(spec)
        self.qkv, self.z, self.b, self.a = (weights[f"in_proj_{n}.weight"] for n in ("qkv", "z", "b", "a"))
        self.conv, self.dt_bias, self.norm = weights["conv1d.weight"], weights["dt_bias"], weights["norm.weight"]
        self.decay_rate = -weights["A_log"].float().exp()  # [value heads]: g = -exp(A_log) softplus(a + dt_bias)
        self.out = weights["out_proj.weight"]

    def _fresh_state(self, b: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (conv, _), (rec, dtype) = self.store(self.spec).state
        return x.new_zeros((b, *conv)), x.new_zeros((b, *rec), dtype=dtype)

    def __call__(self, layer: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                 mask: torch.Tensor, kv: KVCache | KVPool | None) -> torch.Tensor:
        # x: [b, t, hidden]; mask: [b, t], the real tokens (left padding contributes nothing, as in transformers)
        d = self.d
        b, t, _ = x.shape
        x = x.masked_fill(~mask[..., None], 0)
        conv_state, state = kv.state(layer) if kv is not None else self._fresh_state(b, x)
        mixed, conv_state = causal_conv(float_linear(x, self.qkv), conv_state, self.conv)
        q, k, v = mixed.split([d.keys, d.keys, d.values], dim=-1)
        beta = torch.sigmoid(float_linear(x, self.b))                                   # [b, t, value heads]
        g = self.decay_rate * F.softplus(float_linear(x, self.a).float() + self.dt_bias)
        out, state = self._delta_rule(q.view(b, t, d.key_heads, -1), k.view(b, t, d.key_heads, -1),
                                      v.view(b, t, d.value_heads, -1), g, beta, state)
        if kv is not None:
            kv.set_state(layer, conv_state, state)
        z = float_linear(x, self.z).view(b, t, d.value_heads, d.value_dim)
        out = gated_rms_norm(out.to(x.dtype), z, self.norm, self.spec.rms_norm_eps)
        return float_linear(out.reshape(b, t, -1), self.out)

    def _delta_rule(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                    state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [b, t, key heads, dk]; v: [b, t, value heads, dv]; g, beta: [b, t, value heads] -> outputs
        [b, t, value heads, dv] (float32) and the new state. Each key head serves value_heads / key_heads
        consecutive value heads (grouped value attention)."""
        group = self.d.value_heads // self.d.key_heads
        q, k = (l2_normalize(x.float()).repeat_interleave(group, dim=2).transpose(1, 2) for x in (q, k))
        q = q * self.d.key_dim**-0.5
        v, g, beta = v.float().transpose(1, 2), g.transpose(1, 2), beta.float().transpose(1, 2)
        if q.shape[2] == 1:  # decode: the recurrence (the chunked form would pad one token to 64)
            out, state = recurrent_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[..., 0], beta[..., 0], state)
            return out[:, None], state
        out, state = chunked_delta_rule(q, k, v, g, beta, state)
        return out.transpose(1, 2), state


class GroupedGatedDeltaNet(GatedDeltaNet):
    """Qwen3-Next's naming: q, k, v and z in one projection and b and a in another, grouped per key head
    ([q k v z] of key head 0, then of head 1, ...). Reordered once at load into Qwen3.5's split layout, so
    both run the same forward."""

    name: ClassVar[str] = "gated-deltanet-grouped"

    @staticmethod
    def tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        d, h = _Dims.of(spec), spec.hidden_size
        return {"in_proj_qkvz.weight": (2 * d.keys + 2 * d.values, h), "in_proj_ba.weight": (2 * d.value_heads, h),
                **GatedDeltaNet._common(spec)}

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> None:
        d = _Dims.of(spec)
        group = d.value_heads // d.key_heads
        qkvz = weights["in_proj_qkvz.weight"].view(d.key_heads, -1, spec.hidden_size)  # rows per key head
        q, k, v, z = qkvz.split([d.key_dim, d.key_dim, group * d.value_dim, group * d.value_dim], dim=1)
        b, a = weights["in_proj_ba.weight"].view(d.key_heads, 2 * group, -1).split([group, group], dim=1)
        flat = lambda t: t.reshape(-1, spec.hidden_size)  # noqa: E731 - heads in order: value head = key head * group + j
        split = {"in_proj_qkv.weight": torch.cat([flat(q), flat(k), flat(v)]), "in_proj_z.weight": flat(z),
                 "in_proj_b.weight": flat(b), "in_proj_a.weight": flat(a)}
        super().__init__(spec, {**weights, **split})
