"""Tiny random checkpoints of the four families, made with transformers and save_pretrained.

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
