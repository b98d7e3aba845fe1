"""One small adapter per model family: how config.json spells things, what the tensors are called,
which attention / router / activation pieces its decoder layers are made of, and its quirks as
fields. The forward pass (model.py) is family-agnostic: it reads only ModelSpec and the pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention import attention_class
from .config import ModelSpec
from .errors import UnsupportedModelError
from .routers import router_class

Shapes = dict[str, tuple[int, ...]]


def first(cfg: dict, *names: str, default=None):
    """The first field present under any of its spellings (checkpoints disagree on names)."""
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _prefixed(prefix: str, shapes: Shapes) -> Shapes:
    return {prefix + name: shape for name, shape in shapes.items()}


def _mlp_tensors(prefix: str, hidden: int, inter: int) -> Shapes:
    """A resident SwiGLU MLP (dense layer or shared expert): gate, up [inter, hidden], down [hidden, inter]."""
    return {f"{prefix}.gate_proj.weight": (inter, hidden), f"{prefix}.up_proj.weight": (inter, hidden),
            f"{prefix}.down_proj.weight": (hidden, inter)}


def _rope(cfg: dict) -> tuple[float, float]:
    """(theta, linear factor) from top-level fields or transformers 5's ``rope_parameters``."""
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in ("default", "linear"):
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported yet",
                                    "offload supports default and linear RoPE")
    theta = float(first(cfg, "rope_theta", default=None) or rope.get("rope_theta", 10000.0))
    return theta, float(scaling.get("factor", 1.0)) if rope_type == "linear" else 1.0


@dataclass(frozen=True)
class Family:
    """Tensor names, pieces and quirks of one architecture family."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    moe_prefix: str                      # "block_sparse_moe" or "mlp"
    expert_names: tuple[str, str, str]   # gate, up, down projection names inside experts.N
    sliding_windows: Callable[[dict, int], tuple[int | None, ...]]
    router_fp32_weights: bool = False    # Mixtral keeps routing weights in float32; the others cast back
    norm_topk_prob: bool | None = None   # None: config's norm_topk_prob (default False); Mixtral always renormalises
    default_qkv_bias: bool = False
    o_bias: bool = True                  # whether config's attention_bias also puts a bias on o_proj
    qk_norm: str = "none"                # "none" | "head" | "full"
    shared_expert: bool = False          # a shared expert and its sigmoid gate beside the routed ones
    attention: str = "gqa"               # attention.ATTENTIONS
    router: str = "softmax-topk"         # routers.ROUTERS
    activation: str = "swiglu"           # experts.ACTIVATIONS

    # -- tensor names --------------------------------------------------------------------------
    def expert_modules(self, layer: int, expert: int) -> tuple[str, str, str]:
        """The gate, up and down projections' module names (their tensors are ``<module>.<suffix>``)."""
        base = f"model.layers.{layer}.{self.moe_prefix}.experts.{expert}"
        return tuple(f"{base}.{n}" for n in self.expert_names)  # type: ignore[return-value]

    def global_tensors(self, spec: ModelSpec) -> Shapes:
        shapes = {"model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size),
                  "model.norm.weight": (spec.hidden_size,)}
        if not spec.tie_word_embeddings:
            shapes["lm_head.weight"] = (spec.vocab_size, spec.hidden_size)
        return shapes

    def layer_tensors(self, spec: ModelSpec, i: int) -> dict[str, Shapes]:
        """Every resident tensor of layer ``i``, grouped by the piece that uses it (names -> shapes)."""
        p, h = f"model.layers.{i}", spec.hidden_size
        groups = {"input_norm": {f"{p}.input_layernorm.weight": (h,)},
                  "post_norm": {f"{p}.post_attention_layernorm.weight": (h,)},
                  "attention": _prefixed(f"{p}.self_attn.", attention_class(self.attention).tensors(spec))}
        if not spec.moe_layers[i]:
            groups["dense_mlp"] = _mlp_tensors(f"{p}.mlp", h, spec.dense_intermediate_size)
            return groups
        groups["router"] = _prefixed(f"{p}.{self.moe_prefix}.", router_class(self.router).tensors(spec, "gate.weight"))
        if spec.shared_expert_intermediate_size:
            groups["shared_mlp"] = _mlp_tensors(f"{p}.mlp.shared_expert", h, spec.shared_expert_intermediate_size)
            groups["shared_gate"] = {f"{p}.mlp.shared_expert_gate.weight": (1, h)}
        return groups

    def dense_tensors(self, spec: ModelSpec) -> Shapes:
        """Every resident tensor the spec implies, with its shape (validated against the files)."""
        shapes = self.global_tensors(spec)
        for i in range(spec.num_layers):
            for group in self.layer_tensors(spec, i).values():
                shapes |= group
        return shapes

    # -- config.json ---------------------------------------------------------------------------
    def spec_from_config(self, cfg: dict, checkpoint_dtype: torch.dtype) -> ModelSpec:
        hidden, heads, layers = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"])
        num_experts = int(first(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0))
        if num_experts <= 0:
            raise UnsupportedModelError(f"config.json declares no experts for {self.name}",
                                        "offload runs Mixture-of-Experts checkpoints only")
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"activation {cfg['hidden_act']!r} is not supported", "offload supports silu")
        step = int(cfg.get("decoder_sparse_step") or 1)
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        theta, linear_factor = _rope(cfg)
        return ModelSpec(
            family=self.name, architecture=(cfg.get("architectures") or [self.architectures[0]])[0],
            vocab_size=int(cfg["vocab_size"]), hidden_size=hidden, num_layers=layers, num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or (hidden // heads if heads > 0 else 0)),
            num_experts=num_experts, top_k=int(first(cfg, "num_experts_per_tok", "moe_topk", default=2)),
            expert_intermediate_size=int(first(cfg, "moe_intermediate_size", "intermediate_size")),
            dense_intermediate_size=int(cfg.get("intermediate_size") or 0),
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0)
            if self.shared_expert else 0,
            moe_layers=tuple(i not in mlp_only and (i + 1) % step == 0 for i in range(layers)),
            sliding_windows=self.sliding_windows(cfg, layers),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)) if self.norm_topk_prob is None
            else self.norm_topk_prob,
            router_fp32_weights=self.router_fp32_weights,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_linear_factor=linear_factor,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(first(cfg, "qkv_bias", "attention_bias", default=self.default_qkv_bias)),
            o_bias=self.o_bias and bool(cfg.get("attention_bias", False)),
            qk_norm=self.qk_norm, checkpoint_dtype=checkpoint_dtype, bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_eos_ids(cfg.get("eos_token_id")), pad_token_id=cfg.get("pad_token_id"),
            mlp_only_layers=tuple(sorted(mlp_only)),
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


_HF_MLP = ("gate_proj", "up_proj", "down_proj")

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("mixtral", ("MixtralForCausalLM",), ("mixtral",), "block_sparse_moe", ("w1", "w3", "w2"),
               _uniform_window, router_fp32_weights=True, norm_topk_prob=True),
        Family("qwen2_moe", ("Qwen2MoeForCausalLM",), ("qwen2_moe",), "mlp", _HF_MLP, _qwen2_windows,
               default_qkv_bias=True, o_bias=False, shared_expert=True),
        Family("qwen3_moe", ("Qwen3MoeForCausalLM",), ("qwen3_moe",), "mlp", _HF_MLP, _qwen3_windows, qk_norm="head"),
        Family("olmoe", ("OlmoeForCausalLM",), ("olmoe",), "mlp", _HF_MLP, _uniform_window, qk_norm="full"),
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
    has_experts = first(cfg, "num_local_experts", "num_experts")
    kind = "not supported yet" if has_experts else "a dense or unsupported architecture"
    raise UnsupportedModelError(f"{name} is {kind}", f"offload runs these MoE families: {supported}")
