"""One small adapter per model family: how config.json spells things, what the tensors are called,
and the router's rules. The forward pass in model.py is family-agnostic and reads only ModelSpec
and these adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import ModelSpec
from .errors import UnsupportedModelError


def _first(cfg: dict, *names: str, default=None):
    """The first field present under any of its spellings (checkpoints disagree on names)."""
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


@dataclass(frozen=True)
class Family:
    """Tensor names and router rules of one architecture family."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    moe_prefix: str                      # "block_sparse_moe" or "mlp"
    expert_names: tuple[str, str, str]   # gate, up, down projection names inside experts.N
    router_weights_fp32: bool            # Mixtral keeps routing weights in float32; the others cast back
    default_qkv_bias: bool
    qk_norm: str                          # "none" | "head" | "full"
    has_shared_expert: bool
    sliding_windows: Callable[[dict, int], tuple[int | None, ...]]

    def expert_tensor_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        base = f"model.layers.{layer}.{self.moe_prefix}.experts.{expert}"
        return tuple(f"{base}.{n}.weight" for n in self.expert_names)  # type: ignore[return-value]

    def router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe_prefix}.gate.weight"

    def spec_from_config(self, cfg: dict, checkpoint_dtype: torch.dtype) -> ModelSpec:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        num_experts = int(_first(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0))
        if num_experts <= 0:
            raise UnsupportedModelError(f"config.json declares no experts for {self.name}",
                                        "offload runs Mixture-of-Experts checkpoints only")
        dense_inter = int(cfg.get("intermediate_size") or 0)
        expert_inter = int(_first(cfg, "moe_intermediate_size", "intermediate_size"))
        step = int(cfg.get("decoder_sparse_step") or 1)
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        moe_layers = tuple(i not in mlp_only and (i + 1) % step == 0 for i in range(layers))
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or rope
        rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        if rope_type not in ("default", "linear"):
            raise UnsupportedModelError(f"rope type {rope_type!r} is not supported yet",
                                        "offload supports default and linear RoPE")
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"activation {cfg['hidden_act']!r} is not supported", "offload supports silu")
        return ModelSpec(
            family=self.name,
            architecture=(cfg.get("architectures") or [self.architectures[0]])[0],
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            num_experts=num_experts,
            top_k=int(_first(cfg, "num_experts_per_tok", "moe_topk", default=2)),
            expert_intermediate_size=expert_inter,
            dense_intermediate_size=dense_inter,
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0)
            if self.has_shared_expert else 0,
            moe_layers=moe_layers,
            sliding_windows=self.sliding_windows(cfg, layers),
            norm_topk_prob=True if self.name == "mixtral" else bool(cfg.get("norm_topk_prob", False)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_first(cfg, "rope_theta", default=None) or rope.get("rope_theta", 10000.0)),
            rope_linear_factor=float(scaling.get("factor", 1.0)) if rope_type == "linear" else 1.0,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(_first(cfg, "qkv_bias", "attention_bias", default=self.default_qkv_bias)),
            o_bias=bool(cfg.get("attention_bias", False)) if self.name != "qwen2_moe" else False,
            qk_norm=self.qk_norm,
            checkpoint_dtype=checkpoint_dtype,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
            pad_token_id=cfg.get("pad_token_id"),
        )


def _uniform_window(cfg: dict, layers: int) -> tuple[int | None, ...]:
    """Mixtral/OLMoE: one sliding window (or none) for every layer."""
    return (cfg.get("sliding_window"),) * layers


def _qwen2_windows(cfg: dict, layers: int) -> tuple[int | None, ...]:
    """Qwen2-MoE: with use_sliding_window, the layers layer_types names (else transformers' default rule)."""
    if not cfg.get("use_sliding_window") or not cfg.get("sliding_window"):
        return (None,) * layers
    window = int(cfg["sliding_window"])
    if cfg.get("layer_types"):
        return tuple(window if t == "sliding_attention" else None for t in cfg["layer_types"])
    limit = int(cfg.get("max_window_layers", layers))
    return tuple(window if (i + 1) % 2 and i < limit else None for i in range(layers))


def _qwen3_windows(cfg: dict, layers: int) -> tuple[int | None, ...]:
    """Qwen3-MoE: one window on every layer, only with use_sliding_window."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    return (window,) * layers


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("mixtral", ("MixtralForCausalLM",), ("mixtral",), "block_sparse_moe", ("w1", "w3", "w2"),
               router_weights_fp32=True, default_qkv_bias=False, qk_norm="none", has_shared_expert=False,
               sliding_windows=_uniform_window),
        Family("qwen2_moe", ("Qwen2MoeForCausalLM",), ("qwen2_moe",), "mlp", ("gate_proj", "up_proj", "down_proj"),
               router_weights_fp32=False, default_qkv_bias=True, qk_norm="none", has_shared_expert=True,
               sliding_windows=_qwen2_windows),
        Family("qwen3_moe", ("Qwen3MoeForCausalLM",), ("qwen3_moe",), "mlp", ("gate_proj", "up_proj", "down_proj"),
               router_weights_fp32=False, default_qkv_bias=False, qk_norm="head", has_shared_expert=False,
               sliding_windows=_qwen3_windows),
        Family("olmoe", ("OlmoeForCausalLM",), ("olmoe",), "mlp", ("gate_proj", "up_proj", "down_proj"),
               router_weights_fp32=False, default_qkv_bias=False, qk_norm="full", has_shared_expert=False,
               sliding_windows=_uniform_window),
    )
}


def family_for_config(cfg: dict) -> Family:
    """The adapter for a config.json, or an error naming the architecture and the supported ones."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type", "")
    for fam in FAMILIES.values():
        if model_type in fam.model_types or any(a in fam.architectures for a in archs):
            return fam
    name = archs[0] if archs else (model_type or "unknown")
    supported = ", ".join(a for f in FAMILIES.values() for a in f.architectures)
    kind = "a dense or unsupported architecture" if not _first(cfg, "num_local_experts", "num_experts") else "not supported yet"
    raise UnsupportedModelError(f"{name} is {kind}", f"offload runs these MoE families: {supported}")
