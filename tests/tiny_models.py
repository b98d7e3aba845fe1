"""Tiny random checkpoints of every family, made with transformers and save_pretrained.

Each keeps the real config's field spellings (see ../shared/configs) and scales sizes down.
initializer_range is large (0.2) so that logits and router scores are well separated: with the
default 0.02 random models emit near-ties and an "identical tokens" check means little.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, tie_word_embeddings=False)


_LINEAR = dict(linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
               linear_num_value_heads=4)


def family_configs():
    """(name, transformers config class name, kwargs) for the four families, with their quirks exercised."""
    return {
        "mixtral": ("MixtralConfig", dict(COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                          rope_theta=1e6)),
        # shared expert + gate, decoder_sparse_step 1 with a dense layer forced by mlp_only_layers, qkv bias
        "qwen2_moe": ("Qwen2MoeConfig", dict(COMMON, intermediate_size=64, moe_intermediate_size=24, num_experts=6,
                                             num_experts_per_tok=2, shared_expert_intermediate_size=40,
                                             decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False)),
        # head_dim that differs from hidden / heads, per-head q/k norm, renormalised top-k
        "qwen3_moe": ("Qwen3MoeConfig", dict(COMMON, intermediate_size=64, moe_intermediate_size=24, num_experts=8,
                                             num_experts_per_tok=3, head_dim=12, norm_topk_prob=True,
                                             decoder_sparse_step=1, mlp_only_layers=[])),
        # q/k norm over the whole projection
        "olmoe": ("OlmoeConfig", dict(COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                      norm_topk_prob=False)),
        # sinks, q/k/v/o biases, sliding / full layers (window 4 < the prompts), YaRN, router bias, fused experts
        # with biases and a clamped SwiGLU (limit low enough to clamp at this init)
        "gpt_oss": ("GptOssConfig", dict(COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                         head_dim=8, sliding_window=4, swiglu_limit=1.5,
                                         layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
        # MLA with a q bottleneck, interleaved YaRN RoPE with mscale, sigmoid routing over 2 groups (1 kept) with
        # a correction bias and a scale, a dense first layer, a shared expert
        "deepseek_v3": ("DeepseekV3Config", dict(
            COMMON, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
            n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
            q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            routed_scaling_factor=2.5, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                        "original_max_position_embeddings": 64, "mscale": 1.0,
                                                        "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})),
        # DeepSeek-V2(-Lite): MLA without a q bottleneck, complex-pair RoPE, greedy softmax routing with a scale
        "deepseek_v2": ("DeepseekV2Config", dict(
            COMMON, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
            n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=8,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, topk_method="greedy", routed_scaling_factor=1.5)),
        # partial rotary (half the head), per-head q/k norm, q/k/v biases, the DeepSeek router, a dense first layer
        "glm4_moe": ("Glm4MoeConfig", dict(
            COMMON, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, head_dim=8,
            partial_rotary_factor=0.5, use_qk_norm=True, attention_bias=True, routed_scaling_factor=1.5)),
        # GLM-4.7-Flash: MLA with a q bottleneck, the DeepSeek-V3 router, mlp_layer_types naming the dense layer
        "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(
            COMMON, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
            n_shared_experts=1, num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8, routed_scaling_factor=1.8,
            mlp_layer_types=["dense", "sparse", "sparse"])),
        # Gated DeltaNet in three of four layers (2 key heads serving 4 value heads; conv kernel 4, shorter than the
        # prompts), gated full attention with a quarter of the head rotated in the fourth, zero-centred norms, a
        # gated shared expert
        "qwen3_next": ("Qwen3NextConfig", dict(
            COMMON, num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=16,
            shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2, head_dim=16, **_LINEAR)),
        # Qwen3.5: the same hybrid with split linear-attention projections, top-k always renormalised
        "qwen3_5_moe": ("Qwen3_5MoeTextConfig", dict(
            COMMON, num_hidden_layers=4, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
            num_experts_per_tok=3, head_dim=16, **_LINEAR)),
        # q/k norm over the whole projection, half the head rotated (rotary_dim), sigmoid routing with a
        # correction bias held by the MoE block
        "minimax_m2": ("MiniMaxM2Config", dict(COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                                               head_dim=8, rotary_dim=4)),
        # Gemma-4's MoE: sliding layers (window 4 < the prompts) and a full layer with a wider head, one kv head
        # whose keys are also its values and proportional RoPE; a dense MLP beside the experts, soft-capped logits
        "gemma4": ("Gemma4TextConfig", dict(
            COMMON, intermediate_size=24, enable_moe_block=True, num_experts=8, top_k_experts=2,
            moe_intermediate_size=16, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
            attention_k_eq_v=True, sliding_window=4, hidden_size_per_layer_input=0, final_logit_softcapping=5.0,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    }


def make_tiny_model(family: str, out: Path, dtype: torch.dtype = torch.float32, shard_bytes: str | None = None,
                    seed: int = 0) -> Path:
    """Save a random tiny model of ``family`` into ``out`` (sharded with an index when shard_bytes is given)."""
    import transformers

    cls_name, kwargs = family_configs()[family]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    model.eval()
    _randomize_zero_starts(model, seed)
    save_kwargs = {"max_shard_size": shard_bytes} if shard_bytes else {}
    model.save_pretrained(out, **save_kwargs)
    return out


def add_char_tokenizer(out: Path) -> Path:
    """A character-level tokenizer.json for a tiny model (ids 0-2 special, then printable ASCII)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 32 + VOCAB - 3)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(out / "tokenizer.json"))
    return out


def _randomize_zero_starts(model, seed: int) -> None:
    """Biases, sinks and router correction biases start at zero, and zero-centred norms (Qwen3-Next's 1 + w), dt_bias
    and Gemma-4's router and layer scales at a constant, which would leave their code untested: give every such
    tensor seeded random values (ones-initialised norms stay as they are)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point():
                continue
            if ("bias" in name or "sinks" in name or "norm" in name) and not t.any():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
            elif name.endswith(("dt_bias", "scale", "layer_scalar")) and bool((t == t.flatten()[0]).all()):
                t.add_(torch.randn(t.shape, generator=gen) * 0.2)
