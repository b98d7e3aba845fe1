"""What a checkpoint is: ModelSpec (and its RopeSpec), read from config.json by a family adapter.

Frozen and validated in ``__post_init__``: a spec whose fields contradict each other fails at load with
the config.json field named. Every layer reads it; it imports nothing of the project but its errors.
(How to run a checkpoint is RuntimeConfig, in runtime/config.py.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload.errors import CheckpointError, ConfigError, UnsupportedModelError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}
QK_NORMS = ("none", "head", "full")
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")
ROPE_KINDS = ("default", "linear", "yarn", "proportional")


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None or 'auto' -> None (checkpoint's)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value.lower() == "auto":
        return None
    if value.lower() not in DTYPES:
        raise ConfigError(f"unknown dtype {value!r}", "use one of: auto, float32, bfloat16, float16")
    return DTYPES[value.lower()]


# Config.json spellings of the spec's fields, for errors a user can find in the file.
_CONFIG_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                 "num_kv_heads": "num_key_value_heads", "num_experts": "num_local_experts / num_experts",
                 "top_k": "num_experts_per_tok", "expert_intermediate_size": "moe_intermediate_size",
                 "dense_intermediate_size": "intermediate_size"}


def _field(name: str) -> str:
    return _CONFIG_NAMES.get(name, name)


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding as config.json describes it (default, linear or YaRN scaling)."""

    theta: float = 10000.0
    dim: int = 0                    # rotated dims per head (0: all of head_dim); partial rotary and MLA rotate fewer
    kind: str = "default"           # "default" | "linear" | "yarn"
    factor: float = 1.0             # linear / YaRN scaling factor
    original_max_positions: int = 0  # YaRN: the pretraining context
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0             # YaRN (DeepSeek): attention factor = mscale(factor, mscale) / mscale(..., all_dim)
    mscale_all_dim: float = 0.0
    attention_factor: float = 0.0   # YaRN: explicit cos/sin scale (0: derived from factor and mscales)
    truncate: bool = True           # YaRN: round the correction range to whole dims
    interleave: bool = False        # rotate (x0, x1), (x2, x3) pairs (DeepSeek) instead of the two halves
    proportion: float = 1.0         # "proportional" (Gemma-4's global layers): the share of the head's frequencies
    #                                 that rotate, with exponents over the whole head; the rest are 0 (no rotation)

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise UnsupportedModelError(f"rope type {self.kind!r} is not supported yet",
                                        f"offload supports {', '.join(ROPE_KINDS)} RoPE")
        if not 0 < self.proportion <= 1:
            raise CheckpointError(f"config.json: partial_rotary_factor={self.proportion} must lie in (0, 1]",
                                  "fix config.json")
        if self.theta <= 0 or self.factor <= 0 or self.dim < 0 or self.dim % 2:
            raise CheckpointError(f"config.json: rope_theta={self.theta}, factor={self.factor} and the rotary dim "
                                  f"{self.dim} must be positive (and the dim even)", "fix config.json")


@dataclass(frozen=True)
class ModelSpec:
    """Everything the forward pass needs to know about a checkpoint, read from config.json."""

    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    dense_intermediate_size: int          # for layers that are dense MLPs (mlp_only_layers, sparse step)
    shared_expert_intermediate_size: int  # 0 when the family has no shared expert
    moe_layers: tuple[bool, ...]          # per layer: MoE block (True) or dense MLP (False)
    sliding_windows: tuple[int | None, ...]
    norm_topk_prob: bool
    rms_norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: str                           # "none" | "head" (Qwen3: per head) | "full" (OLMoE: whole projection)
    checkpoint_dtype: torch.dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    router_fp32_weights: bool = False      # routing weights stay float32 (Mixtral) or follow the compute dtype
    mlp_only_layers: tuple[int, ...] = ()  # as config.json lists them (checked against num_layers)
    # routers with groups and a scale (DeepSeek-V3, GLM-4.5): experts in n_group groups, the best topk_group kept
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_bias: bool = False              # gpt-oss: the router has a bias
    # experts: biases on every projection and a clamped SwiGLU (gpt-oss)
    expert_bias: bool = False
    swiglu_limit: float = 0.0              # 0: no clamp
    swiglu_alpha: float = 1.702
    attention_sinks: bool = False          # gpt-oss: a learned per-head logit beside every row of scores
    # Multi-head Latent Attention (DeepSeek-V2/V3): ranks of the compressed q and kv, per-head dims
    q_lora_rank: int = 0                   # 0: a plain q_proj
    kv_lora_rank: int = 0                  # 0: not MLA
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # per layer: "full_attention" | "sliding_attention" | "linear_attention" (config.json's layer_types; () reads as
    # attention everywhere); the family adapter maps each type to an attention piece
    layer_types: tuple[str, ...] = ()
    # Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5): its heads, head dims and causal conv kernel
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0
    # Gemma-4: embeddings scaled by sqrt(hidden); the full-attention layers' own head dim, kv heads and RoPE, and
    # keys that double as values there (attention_k_eq_v); the final logits soft-capped (tanh) at a value
    embed_scale: float = 1.0
    global_head_dim: int = 0               # 0: as head_dim
    global_num_kv_heads: int = 0           # 0: as num_kv_heads
    global_rope: RopeSpec | None = None    # None: as rope
    attention_k_eq_v: bool = False
    final_logit_softcapping: float = 0.0   # 0: none

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "num_experts", "top_k", "expert_intermediate_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                self._fail(f"{_field(name)}={getattr(self, name)} must be > 0")
        if self.num_heads % self.num_kv_heads:
            self._fail(f"num_key_value_heads={self.num_kv_heads} does not divide num_attention_heads={self.num_heads}")
        if self.top_k > self.num_experts:
            self._fail(f"num_experts_per_tok={self.top_k} exceeds the {self.num_experts} experts per layer")
        if len(self.moe_layers) != self.num_layers or len(self.sliding_windows) != self.num_layers:
            self._fail(f"per-layer lists (layer_types, ...) have {len(self.sliding_windows)} entries for "
                       f"num_hidden_layers={self.num_layers}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad:
            self._fail(f"mlp_only_layers names layer {bad[0]}, outside 0..{self.num_layers - 1}")
        if not any(self.moe_layers):
            self._fail("no layer is a MoE layer (decoder_sparse_step / mlp_only_layers leave none)")
        if not all(self.moe_layers) and self.dense_intermediate_size <= 0:
            self._fail("dense layers need intermediate_size > 0")
        if any(w is not None and w <= 0 for w in self.sliding_windows):
            self._fail("sliding_window must be > 0")
        if self.rms_norm_eps <= 0:
            self._fail("rms_norm_eps must be > 0")
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            self._fail(f"n_group={self.n_group} must divide the {self.num_experts} experts and topk_group="
                       f"{self.topk_group} lie in 1..n_group")
        if self.kv_lora_rank and min(self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim) <= 0:
            self._fail("MLA needs qk_nope_head_dim, qk_rope_head_dim and v_head_dim > 0")
        if self.qk_norm not in QK_NORMS:
            self._fail(f"qk_norm {self.qk_norm!r} is not one of {QK_NORMS}")
        self._check_layer_types()
        if self.global_num_kv_heads and self.num_heads % self.global_num_kv_heads:
            self._fail(f"num_global_key_value_heads={self.global_num_kv_heads} does not divide "
                       f"num_attention_heads={self.num_heads}")
        if self.embed_scale <= 0 or self.final_logit_softcapping < 0:
            self._fail("the embedding scale must be > 0 and final_logit_softcapping >= 0")

    def _check_layer_types(self) -> None:
        if self.layer_types and len(self.layer_types) != self.num_layers:
            self._fail(f"layer_types has {len(self.layer_types)} entries for num_hidden_layers={self.num_layers}")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            self._fail(f"layer_types names {unknown[0]!r}, not one of {LAYER_TYPES}")
        if "linear_attention" not in self.layer_types:
            return
        heads, dims = (self.linear_num_key_heads, self.linear_num_value_heads), (self.linear_key_head_dim,
                                                                                  self.linear_value_head_dim)
        if min(*heads, *dims) <= 0 or self.linear_conv_kernel < 1:
            self._fail("linear attention layers need linear_num_key_heads, linear_num_value_heads, "
                       "linear_key_head_dim, linear_value_head_dim and linear_conv_kernel_dim > 0")
        if heads[1] % heads[0]:
            self._fail(f"linear_num_key_heads={heads[0]} does not divide linear_num_value_heads={heads[1]}")

    @staticmethod
    def _fail(what: str) -> None:
        raise CheckpointError(f"config.json: {what}", "fix config.json or re-download the checkpoint")

    @property
    def rope_theta(self) -> float:
        return self.rope.theta

    def layer_type(self, layer: int) -> str:
        """The layer's attention type ("full_attention" where config.json names none)."""
        return self.layer_types[layer] if self.layer_types else "full_attention"

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def total_experts(self) -> int:
        return self.num_moe_layers * self.num_experts

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.expert_intermediate_size
