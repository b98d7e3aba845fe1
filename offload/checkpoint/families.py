"""One small adapter per model family: how config.json spells things, what the tensors are called,
which attention / router / activation pieces its decoder layers are made of, and its quirks as
fields. The forward pass (model/forward.py) is family-agnostic: it reads only ModelSpec and the pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from offload.errors import UnsupportedModelError
from offload.model.attention import attention_class
from offload.model.routers import router_class
from offload.spec import ModelSpec, RopeSpec

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


def _rope_spec(cfg: dict, head_dim: int, interleave: bool) -> RopeSpec:
    """RoPE from top-level fields, ``rope_scaling`` (older checkpoints) or transformers 5's ``rope_parameters``."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    theta = float(first(cfg, "rope_theta", default=None) or params.get("rope_theta", 10000.0))
    partial = float(first(cfg, "partial_rotary_factor", default=None) or params.get("partial_rotary_factor", 0) or
                    (int(cfg["rotary_dim"]) / head_dim if cfg.get("rotary_dim") and head_dim else 1.0))  # MiniMax
    get = lambda key, default=0.0: float(scaling.get(key) or default)  # noqa: E731
    proportional = kind == "proportional"  # Gemma-4: the whole head turns, a share of its frequencies nonzero
    return RopeSpec(
        theta=theta, dim=int(head_dim * partial) if partial < 1 and not proportional else 0, kind=kind,
        proportion=partial if proportional else 1.0,
        factor=get("factor", 1.0) if kind in ("linear", "yarn") else 1.0,
        original_max_positions=int(get("original_max_position_embeddings", cfg.get("max_position_embeddings", 0))),
        beta_fast=get("beta_fast", 32.0), beta_slow=get("beta_slow", 1.0), mscale=get("mscale"),
        mscale_all_dim=get("mscale_all_dim"), attention_factor=get("attention_factor"),
        truncate=bool(scaling.get("truncate", True)) if scaling else True,
        interleave=bool(cfg.get("rope_interleave", interleave)))


def _moe_layers(cfg: dict, layers: int) -> tuple[bool, ...]:
    """Which layers are MoE: mlp_layer_types ("dense" / "sparse", GLM-4.7-Flash), decoder_sparse_step /
    mlp_only_layers (Qwen) or first_k_dense_replace / moe_layer_freq (DeepSeek, GLM-4.5)."""
    if isinstance(cfg.get("mlp_layer_types"), list):
        return tuple(t == "sparse" for t in cfg["mlp_layer_types"])
    step = int(cfg.get("decoder_sparse_step") or 1)
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    freq = int(cfg.get("moe_layer_freq") or 1)
    return tuple(i not in mlp_only and (i + 1) % step == 0 and i >= first_dense and i % freq == 0
                 for i in range(layers))


def _mla_options(cfg: dict) -> dict:
    """DeepSeek's attention dims (MLA) and group-limited router."""
    return {"q_lora_rank": int(cfg.get("q_lora_rank") or 0), "kv_lora_rank": int(cfg["kv_lora_rank"]),
            "qk_nope_head_dim": int(cfg["qk_nope_head_dim"]), "qk_rope_head_dim": int(cfg["qk_rope_head_dim"]),
            "v_head_dim": int(cfg["v_head_dim"]), **_group_router_options(cfg)}


def _group_router_options(cfg: dict) -> dict:
    greedy = cfg.get("topk_method") == "greedy"  # DeepSeek-V2-Lite: groups ignored
    return {"n_group": 1 if greedy else int(cfg.get("n_group") or 1),
            "topk_group": 1 if greedy else int(cfg.get("topk_group") or 1),
            "routed_scaling_factor": float(cfg.get("routed_scaling_factor") or 1.0)}


def _linear_attention_options(cfg: dict) -> dict:
    """Gated DeltaNet's heads, head dims and conv kernel (Qwen3-Next, Qwen3.5)."""
    return {"linear_num_key_heads": int(cfg.get("linear_num_key_heads") or 0),
            "linear_num_value_heads": int(cfg.get("linear_num_value_heads") or 0),
            "linear_key_head_dim": int(cfg.get("linear_key_head_dim") or 0),
            "linear_value_head_dim": int(cfg.get("linear_value_head_dim") or 0),
            "linear_conv_kernel": int(cfg.get("linear_conv_kernel_dim") or 0)}


def _gemma_options(cfg: dict) -> dict:
    """Gemma-4: sqrt(hidden) embedding scale, final logit soft-capping, RoPE per layer type (rope_parameters keyed by
    it), and the full-attention layers' own head dim and kv heads (per_layer_config as transformers saves it, or
    global_head_dim / num_global_key_value_heads as released configs spell them; the kv heads only with
    attention_k_eq_v, as transformers reads them)."""
    for name in ("hidden_size_per_layer_input", "num_kv_shared_layers"):
        if cfg.get(name):
            raise UnsupportedModelError(f"Gemma-4 with {name}={cfg[name]} (the small dense models' per-layer "
                                        "embeddings / shared KV) is not supported", "offload runs Gemma-4's MoE")
    if cfg.get("use_bidirectional_attention") == "all":
        raise UnsupportedModelError("Gemma-4 with bidirectional attention is not supported", "use a causal model")
    full = next((v for v in (cfg.get("per_layer_config") or {}).values() if isinstance(v, dict)), {})
    k_eq_v = bool(cfg.get("attention_k_eq_v", False))
    head_dim = int(full.get("head_dim") or cfg.get("global_head_dim") or cfg.get("head_dim") or 0)
    kv_heads = int(full.get("num_key_value_heads") or (cfg.get("num_global_key_value_heads") if k_eq_v else 0) or 0)
    ropes = cfg.get("rope_parameters") or {}
    rope = lambda kind, dim: _rope_spec({"rope_parameters": ropes.get(kind) or {}}, dim, False)  # noqa: E731
    return {"embed_scale": float(cfg["hidden_size"]) ** 0.5, "attention_k_eq_v": k_eq_v,
            "final_logit_softcapping": float(cfg.get("final_logit_softcapping") or 0.0),
            "rope": rope("sliding_attention", int(cfg.get("head_dim") or 0)),
            "global_rope": rope("full_attention", head_dim), "global_head_dim": head_dim,
            "global_num_kv_heads": kv_heads}


def _gpt_oss_options(cfg: dict) -> dict:
    return {"router_bias": True, "expert_bias": True, "attention_sinks": True,
            "swiglu_limit": float(cfg.get("swiglu_limit") or 7.0),
            "swiglu_alpha": float(cfg.get("swiglu_alpha") or 1.702)}


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
    qk_norm: str = "none"                # "none" | "head" | "full"; "config": config.json's use_qk_norm (per head)
    shared_expert: str = "none"          # "gated": Qwen2-MoE's shared_expert + sigmoid gate; "plain": DeepSeek's
    #                                      shared_experts (n_shared_experts x moe_intermediate_size), added as is
    attention: str = "gqa"               # attention.ATTENTIONS
    router: str = "softmax-topk"         # routers.ROUTERS
    router_module: str = "gate"          # the router's module under moe_prefix ("router" for gpt-oss)
    activation: str = "swiglu"           # experts.ACTIVATIONS
    # checkpoint/storage.STORAGES, the first whose tensors the checkpoint has: one module per expert, or fused per
    # layer (gpt-oss; Qwen3.5's hub layout, while transformers' save_pretrained writes one module per expert)
    expert_storage: tuple[str, ...] = ("per-expert",)
    rope_interleave: bool = False        # default of config.json's rope_interleave (DeepSeek: True)
    options: Callable[[dict], dict] | None = None  # family-only ModelSpec fields read from config.json
    # attention pieces of other layer types than ``attention``'s (Qwen3-Next: "linear_attention" layers)
    attention_by_type: dict[str, str] = field(default_factory=dict)
    layer_types: Callable[[dict, int], tuple[str, ...]] | None = None  # None: from config.json's layer_types
    norm_offset: float = 0.0             # RMSNorm weights stored zero-centred: the norm scales by (1 + w) (Qwen3-Next)
    hidden_act: str = "silu"             # config.json's hidden_act / hidden_activation that ``activation`` computes
    # DecoderLayer norm -> its module under the layer; Gemma-4's sandwich adds output norms, and in MoE layers
    # (moe_norms) the norms of the dense MLP and the expert branches beside each other
    norms: dict[str, str] = field(default_factory=lambda: dict(_PRE_NORMS))
    moe_norms: dict[str, str] = field(default_factory=dict)
    dense_beside_moe: bool = False       # Gemma-4: a dense MLP in every layer, summed with the MoE block's output
    layer_scale: str = ""                # Gemma-4: a per-layer output scale [1] ("layer_scalar")

    @property
    def router_path(self) -> str:
        """The router's module under a decoder layer ("mlp.gate"; MiniMax's bias sits on the MoE block itself)."""
        return ".".join(p for p in (self.moe_prefix, self.router_module) if p)

    def layer_pieces(self, spec: ModelSpec) -> list[str]:
        """Each layer's attention piece (attention.ATTENTIONS), by its layer type."""
        return [self.attention_by_type.get(spec.layer_type(i), self.attention) for i in range(spec.num_layers)]

    # -- tensor names --------------------------------------------------------------------------
    def expert_modules(self, layer: int, expert: int) -> tuple[str, str, str]:
        """The gate, up and down projections' module names (their tensors are ``<module>.<suffix>``)."""
        base = ".".join(p for p in (f"model.layers.{layer}", self.moe_prefix, f"experts.{expert}") if p)
        return tuple(f"{base}.{n}" for n in self.expert_names)  # type: ignore[return-value]

    def global_tensors(self, spec: ModelSpec) -> Shapes:
        shapes = {"model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size),
                  "model.norm.weight": (spec.hidden_size,)}
        if not spec.tie_word_embeddings:
            shapes["lm_head.weight"] = (spec.vocab_size, spec.hidden_size)
        return shapes

    def layer_tensors(self, spec: ModelSpec, i: int) -> dict[str, Shapes]:
        """Every resident tensor of layer ``i``, grouped by the piece that uses it (names -> shapes)."""
        p, h, moe = f"model.layers.{i}", spec.hidden_size, spec.moe_layers[i]
        attention = attention_class(self.layer_pieces(spec)[i])
        norms = {**self.norms, **(self.moe_norms if moe else {})}
        groups = {slot: {f"{p}.{module}.weight": (h,)} for slot, module in norms.items()}
        groups["attention"] = _prefixed(f"{p}.{attention.module}.", attention.tensors(spec))
        if self.layer_scale:
            groups["layer_scale"] = {f"{p}.{self.layer_scale}": (1,)}
        if not moe or self.dense_beside_moe:
            groups["dense_mlp"] = _mlp_tensors(f"{p}.mlp", h, spec.dense_intermediate_size)
        if not moe:
            return groups
        groups["router"] = _prefixed(f"{p}.{self.router_path}.", router_class(self.router).tensors(spec))
        if spec.shared_expert_intermediate_size:
            plural = "s" if self.shared_expert == "plain" else ""
            groups["shared_mlp"] = _mlp_tensors(f"{p}.mlp.shared_expert{plural}", h,
                                                spec.shared_expert_intermediate_size)
            if self.shared_expert == "gated":
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
    def _shared_intermediate(self, cfg: dict) -> int:
        if self.shared_expert == "gated":
            return int(cfg.get("shared_expert_intermediate_size") or 0)
        if self.shared_expert == "plain":
            return int(cfg.get("moe_intermediate_size") or 0) * int(cfg.get("n_shared_experts") or 0)
        return 0

    def _attention_fields(self, cfg: dict, hidden: int, heads: int) -> dict:
        head_dim = int(cfg.get("head_dim") or (hidden // heads if heads > 0 else 0))
        if self.attention == "mla":  # the rotary part of a head is what RoPE sees; head_dim is unused
            head_dim = int(cfg.get("qk_nope_head_dim", 0)) + int(cfg.get("qk_rope_head_dim", 0))
        qk_norm = ("head" if cfg.get("use_qk_norm") else "none") if self.qk_norm == "config" else self.qk_norm
        return {"num_heads": heads, "num_kv_heads": int(cfg.get("num_key_value_heads") or heads), "head_dim": head_dim,
                "qkv_bias": bool(first(cfg, "qkv_bias", "attention_bias", default=self.default_qkv_bias)),
                "o_bias": self.o_bias and bool(cfg.get("attention_bias", False)), "qk_norm": qk_norm,
                "rope": _rope_spec(cfg, head_dim, self.rope_interleave)}

    def spec_from_config(self, cfg: dict, checkpoint_dtype: torch.dtype) -> ModelSpec:
        hidden, heads, layers = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"])
        num_experts = int(first(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0))
        if num_experts <= 0:
            raise UnsupportedModelError(f"config.json declares no experts for {self.name}",
                                        "offload runs Mixture-of-Experts checkpoints only")
        act = first(cfg, "hidden_act", "hidden_activation", default=self.hidden_act)
        if act != self.hidden_act:
            raise UnsupportedModelError(f"activation {act!r} is not supported for {self.name}",
                                        f"{self.name} checkpoints use {self.hidden_act}")
        norm = bool(cfg.get("norm_topk_prob", False)) if self.norm_topk_prob is None else self.norm_topk_prob
        windows = self.sliding_windows(cfg, layers)
        return ModelSpec(
            family=self.name, architecture=(cfg.get("architectures") or [self.architectures[0]])[0],
            vocab_size=int(cfg["vocab_size"]), hidden_size=hidden, num_layers=layers,
            num_experts=num_experts,
            top_k=int(first(cfg, "num_experts_per_tok", "experts_per_token", "moe_topk", "top_k_experts", default=2)),
            expert_intermediate_size=int(first(cfg, "moe_intermediate_size", "intermediate_size")),
            dense_intermediate_size=int(cfg.get("intermediate_size") or 0),
            shared_expert_intermediate_size=self._shared_intermediate(cfg),
            moe_layers=_moe_layers(cfg, layers), sliding_windows=windows,
            layer_types=self.layer_types(cfg, layers) if self.layer_types else _layer_types(cfg, windows),
            norm_topk_prob=norm, router_fp32_weights=self.router_fp32_weights,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            checkpoint_dtype=checkpoint_dtype, bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_eos_ids(cfg.get("eos_token_id")), pad_token_id=cfg.get("pad_token_id"),
            mlp_only_layers=tuple(sorted(set(cfg.get("mlp_only_layers") or []))),
            **{**self._attention_fields(cfg, hidden, heads), **(self.options(cfg) if self.options else {})},
        )


def _layer_types(cfg: dict, windows: tuple[int | None, ...]) -> tuple[str, ...]:
    """config.json's layer_types where it lists the layers' attention types, else sliding or full by window."""
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == len(windows):
        return tuple(types)
    return tuple("full_attention" if w is None else "sliding_attention" for w in windows)


def _hybrid_layer_types(cfg: dict, layers: int) -> tuple[str, ...]:
    """Qwen3-Next / Qwen3.5: layer_types, or (released Qwen3-Next configs) one full-attention layer every
    full_attention_interval layers (4), the rest Gated DeltaNet."""
    if isinstance(cfg.get("layer_types"), list):
        return tuple(cfg["layer_types"])
    interval = int(cfg.get("full_attention_interval") or 4)
    return tuple("full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers))


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


def _layer_type_windows(cfg: dict, layers: int) -> tuple[int | None, ...]:
    """gpt-oss: ``layer_types`` alternates sliding_attention (the window) and full_attention."""
    types = cfg.get("layer_types") or ["full_attention"] * layers
    window = cfg.get("sliding_window")
    return tuple(window if t == "sliding_attention" and window else None for t in types)


def _no_window(cfg: dict, layers: int) -> tuple[int | None, ...]:
    return (None,) * layers


def _qwen3_windows(cfg: dict, layers: int) -> tuple[int | None, ...]:
    """Qwen3-MoE: one window on every layer, only with use_sliding_window."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    return (window,) * layers


_HF_MLP = ("gate_proj", "up_proj", "down_proj")
_PRE_NORMS = {"input_norm": "input_layernorm", "post_norm": "post_attention_layernorm"}
_SANDWICH_NORMS = {"input_norm": "input_layernorm", "attention_out_norm": "post_attention_layernorm",
                   "post_norm": "pre_feedforward_layernorm", "mlp_out_norm": "post_feedforward_layernorm"}
_PARALLEL_MOE_NORMS = {"dense_out_norm": "post_feedforward_layernorm_1", "moe_norm": "pre_feedforward_layernorm_2",
                       "moe_out_norm": "post_feedforward_layernorm_2"}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("mixtral", ("MixtralForCausalLM",), ("mixtral",), "block_sparse_moe", ("w1", "w3", "w2"),
               _uniform_window, router_fp32_weights=True, norm_topk_prob=True),
        Family("qwen2_moe", ("Qwen2MoeForCausalLM",), ("qwen2_moe",), "mlp", _HF_MLP, _qwen2_windows,
               default_qkv_bias=True, o_bias=False, shared_expert="gated"),
        Family("qwen3_moe", ("Qwen3MoeForCausalLM",), ("qwen3_moe",), "mlp", _HF_MLP, _qwen3_windows, qk_norm="head"),
        Family("olmoe", ("OlmoeForCausalLM",), ("olmoe",), "mlp", _HF_MLP, _uniform_window, qk_norm="full"),
        Family("gpt_oss", ("GptOssForCausalLM",), ("gpt_oss",), "mlp", ("gate_up_proj", "gate_up_proj", "down_proj"),
               _layer_type_windows, router="topk-softmax", router_module="router", activation="clamped-swiglu",
               expert_storage=("fused",), options=_gpt_oss_options),
        Family("deepseek_v3", ("DeepseekV3ForCausalLM",), ("deepseek_v3", "kimi_k2"), "mlp", _HF_MLP, _no_window,
               router_fp32_weights=True, shared_expert="plain", attention="mla", router="sigmoid-groups",
               rope_interleave=True, options=_mla_options),
        Family("deepseek_v2", ("DeepseekV2ForCausalLM",), ("deepseek_v2",), "mlp", _HF_MLP, _no_window,
               router_fp32_weights=True, shared_expert="plain", attention="mla", router="softmax-groups",
               rope_interleave=True, options=_mla_options),
        Family("glm4_moe", ("Glm4MoeForCausalLM",), ("glm4_moe",), "mlp", _HF_MLP, _no_window, o_bias=False,
               qk_norm="config", shared_expert="plain", router="sigmoid-groups", router_fp32_weights=True,
               options=_group_router_options),
        # GLM-4.7-Flash: DeepSeek-V2's MLA layout, DeepSeek-V3's router, mlp_layer_types for the dense layers
        Family("glm4_moe_lite", ("Glm4MoeLiteForCausalLM",), ("glm4_moe_lite",), "mlp", _HF_MLP, _no_window,
               router_fp32_weights=True, shared_expert="plain", attention="mla", router="sigmoid-groups",
               rope_interleave=True, options=_mla_options),
        # Gated DeltaNet in three of four layers, gated full attention (partial rotary, per-head q/k norm) in the
        # fourth, zero-centred RMSNorms, a gated shared expert
        Family("qwen3_next", ("Qwen3NextForCausalLM",), ("qwen3_next",), "mlp", _HF_MLP, _no_window, qk_norm="head",
               shared_expert="gated", attention="gated-full",
               attention_by_type={"linear_attention": "gated-deltanet-grouped"}, layer_types=_hybrid_layer_types,
               norm_offset=1.0, options=_linear_attention_options),
        # Qwen3.5/3.6-MoE (the text model of Qwen3_5MoeForConditionalGeneration, under text_config): Qwen3-Next
        # with split linear-attention projections, always-renormalised top-k, experts fused on the hub
        Family("qwen3_5_moe", ("Qwen3_5MoeForCausalLM",), ("qwen3_5_moe_text",), "mlp", _HF_MLP, _no_window,
               qk_norm="head", shared_expert="gated", norm_topk_prob=True, attention="gated-full",
               attention_by_type={"linear_attention": "gated-deltanet"}, layer_types=_hybrid_layer_types,
               norm_offset=1.0, expert_storage=("fused-gate-up", "per-expert"), options=_linear_attention_options),
        # MiniMax-M2: q/k RMSNorm over the whole projection, partial rotary (rotary_dim), sigmoid routing with a
        # selection-only correction bias held by the MoE block
        Family("minimax_m2", ("MiniMaxM2ForCausalLM",), ("minimax_m2",), "block_sparse_moe", ("w1", "w3", "w2"),
               _no_window, qk_norm="full", norm_topk_prob=True, router="sigmoid-bias", router_module="",
               router_fp32_weights=True),
        # Gemma-4's MoE (the text model of Gemma4ForConditionalGeneration with enable_moe_block): sandwich norms, a
        # dense MLP beside the experts, a router on the residual stream with learned scales, GeGLU-tanh, sliding and
        # full layers with their own head dims and RoPE, q/k/v norms, soft-capped logits
        Family("gemma4", ("Gemma4ForCausalLM",), ("gemma4_text",), "", _HF_MLP, _layer_type_windows, qk_norm="head",
               attention="gemma-sliding", attention_by_type={"full_attention": "gemma-global"},
               router="scaled-softmax", router_module="router", router_fp32_weights=True, activation="geglu-tanh",
               hidden_act="gelu_pytorch_tanh", expert_storage=("fused-gate-up",), norms=_SANDWICH_NORMS,
               moe_norms=_PARALLEL_MOE_NORMS, dense_beside_moe=True, layer_scale="layer_scalar",
               options=_gemma_options),
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
    has_experts = first(cfg, "num_local_experts", "num_experts", "n_routed_experts")
    kind = "not supported yet" if has_experts else "a dense or unsupported architecture"
    raise UnsupportedModelError(f"{name} is {kind}", f"offload runs these MoE families: {supported}")
