"""GGUF files written from tiny transformers checkpoints, as llama.cpp's convert_hf_to_gguf.py writes them, with the
dequantized float32 weights a correct reader must reproduce.

Written with ggml-org's ``gguf.GGUFWriter`` and its own name map (``gguf.get_tensor_name_map``, what the converter
calls), following the converter's conventions: experts stacked per layer, Mixtral ("llama") q/k rows permuted for
llama.cpp's rotary, MLA's kv_b split into attn_k_b (transposed) and attn_v_b, gpt-oss's interleaved gate_up split in
two, an absent output.weight for tied embeddings. Nothing here imports offload, so the reader under test cannot share
a bug with the writer. Types gguf.quants quantizes (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, MXFP4) quantize the
tensor; K-quants (Q4_K, Q5_K, Q6_K) and IQ4_NL/IQ4_XS are blocks built from random fields (finite scales), their
values then what ``gguf.quants.dequantize`` says they are.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES

from tests.quant_checkpoints import load_state_dict, write_dequantized

ARCH = {"mixtral": "LLAMA", "qwen2_moe": "QWEN2MOE", "qwen3_moe": "QWEN3MOE", "olmoe": "OLMOE",
        "gpt_oss": "GPT_OSS", "deepseek_v3": "DEEPSEEK2", "deepseek_v2": "DEEPSEEK2", "glm4_moe": "GLM4_MOE"}
QUANTIZABLE = {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4"}
EXPERT = re.compile(r"model\.layers\.(\d+)\..*experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
PROJ = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


# -- blocks -------------------------------------------------------------------------------------------------------


def _f16(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    return rng.uniform(low, high, n).astype(np.float16).view(np.uint8).reshape(n, 2)


def random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator, scale: float = 0.2) -> np.ndarray:
    """Random blocks of ``kind`` for an [rows, cols] matrix whose values are about ``scale`` in size."""
    block, size = GGML_QUANT_SIZES[Q[kind]]
    n = rows * cols // block
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    if kind == "Q4_K" or kind == "Q5_K":  # d, dmin f16, then 6-bit scales and mins, then the quants
        raw[:, 0:2] = _f16(rng, n, scale / 500, scale / 250)
        raw[:, 2:4] = _f16(rng, n, scale / 2000, scale / 1000)
    elif kind == "Q6_K":  # ql, qh, int8 scales, then d f16
        raw[:, 192:208] = rng.integers(-40, 40, (n, 16), dtype=np.int8).view(np.uint8)
        raw[:, 208:210] = _f16(rng, n, scale / 500, scale / 250)
    elif kind == "Q2_K":  # scales, quants, then d and dmin f16
        raw[:, 80:82] = _f16(rng, n, scale / 100, scale / 50)
        raw[:, 82:84] = _f16(rng, n, scale / 400, scale / 200)
    elif kind == "Q3_K":  # high bits, quants, scales, then d f16
        raw[:, 108:110] = _f16(rng, n, scale / 200, scale / 100)
    elif kind in ("IQ4_NL", "IQ4_XS"):  # d f16 first
        raw[:, 0:2] = _f16(rng, n, scale / 300, scale / 100)
    else:
        raise ValueError(kind)
    return raw.reshape(rows, cols // block * size)


def encode(w: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(what the writer stores, its float32 values): quantized by gguf.quants, or random blocks of ``kind``."""
    if kind == "F32":
        return w.astype(np.float32), w.astype(np.float32)
    if kind in QUANTIZABLE:
        data = gguf.quants.quantize(w.astype(np.float32), Q[kind])
    else:
        data = random_blocks(kind, int(np.prod(w.shape[:-1])), w.shape[-1], rng).reshape(*w.shape[:-1], -1)
    return data, gguf.quants.dequantize(data, Q[kind]).reshape(w.shape).astype(np.float32)


def fits(kind: str, w: np.ndarray) -> bool:
    return w.ndim >= 2 and w.shape[-1] % GGML_QUANT_SIZES[Q[kind]][0] == 0


# -- conversion ---------------------------------------------------------------------------------------------------


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: each head's rows from (two halves) to (adjacent pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


Back = dict  # Hugging Face name -> (GGUF values by name -> that tensor): how the oracle checkpoint is put back together


def _stack_experts(sd: dict[str, torch.Tensor], out: dict, back: Back) -> None:
    """Per-expert tensors -> blk.N.ffn_{gate,up,down}_exps.weight [E, out, in]."""
    groups: dict[tuple[int, str], dict[int, str]] = {}
    for name in [n for n in sd if EXPERT.match(n)]:
        m = EXPERT.match(name)
        groups.setdefault((int(m[1]), PROJ[m[3]]), {})[int(m[2])] = name
    for (layer, proj), experts in groups.items():
        new = f"blk.{layer}.ffn_{proj}_exps.weight"
        out[new] = torch.stack([sd.pop(experts[e]) for e in sorted(experts)])
        for e, name in experts.items():
            back[name] = lambda g, new=new, e=e: g[new][e]


def _gpt_oss_experts(sd: dict[str, torch.Tensor], out: dict, back: Back) -> None:
    """gpt-oss's fused in-out gate_up (gate and up interleaved in its columns) -> gate and up [E, out, in]."""
    def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.stack([a, b], dim=-1).flatten(-2)

    for name in [n for n in sd if ".mlp.experts." in n]:
        blk = "blk." + re.match(r"model\.layers\.(\d+)\.", name)[1]
        t = sd.pop(name)
        if name.endswith("gate_up_proj"):
            out[f"{blk}.ffn_gate_exps.weight"], out[f"{blk}.ffn_up_exps.weight"] = (t[..., 0::2].transpose(1, 2),
                                                                                      t[..., 1::2].transpose(1, 2))
            back[name] = lambda g, b=blk: interleave(g[f"{b}.ffn_gate_exps.weight"].transpose(1, 2),
                                                     g[f"{b}.ffn_up_exps.weight"].transpose(1, 2))
        elif name.endswith("gate_up_proj_bias"):
            out[f"{blk}.ffn_gate_exps.bias"], out[f"{blk}.ffn_up_exps.bias"] = t[:, 0::2], t[:, 1::2]
            back[name] = lambda g, b=blk: interleave(g[f"{b}.ffn_gate_exps.bias"], g[f"{b}.ffn_up_exps.bias"])
        elif name.endswith("down_proj"):
            out[f"{blk}.ffn_down_exps.weight"] = t.transpose(1, 2)
            back[name] = lambda g, b=blk: g[f"{b}.ffn_down_exps.weight"].transpose(1, 2)
        else:
            out[f"{blk}.ffn_down_exps.bias"] = t
            back[name] = lambda g, b=blk: g[f"{b}.ffn_down_exps.bias"]


def _split_kv_b(name: str, new: str, t: torch.Tensor, cfg: dict, out: dict, back: Back) -> None:
    heads, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    k_b, v_b = t.view(heads, nope + v, t.shape[-1]).split([nope, v], dim=1)
    kn, vn = new.replace("attn_kv_b", "attn_k_b"), new.replace("attn_kv_b", "attn_v_b")
    out[kn], out[vn] = k_b.transpose(1, 2), v_b
    back[name] = lambda g: torch.cat([g[kn].transpose(1, 2), g[vn]], dim=1).reshape(t.shape)


def gguf_tensors(src: Path, family: str, split_kv_b: bool = True) -> tuple[dict[str, torch.Tensor], Back]:
    """The checkpoint's tensors by GGUF name, in llama.cpp's conventions (float32), and how to put them back."""
    cfg = json.loads((src / "config.json").read_text())
    sd = {k: v.float() for k, v in load_state_dict(src).items()}
    if cfg.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    out: dict[str, torch.Tensor] = {}
    back: Back = {}
    (_gpt_oss_experts if family == "gpt_oss" else _stack_experts)(sd, out, back)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCH[family]], cfg["num_hidden_layers"])
    for name, t in sd.items():
        fixed = name.replace("e_score_correction_bias", "e_score_correction.bias")
        new = names.get_name(fixed + ".weight" if fixed.endswith("sinks") else fixed, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        if family == "mixtral" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"]
            out[new] = _permute(t, heads)
            back[name] = lambda g, new=new, heads=heads: _unpermute(g[new], heads)
        elif split_kv_b and new.endswith("attn_kv_b.weight"):
            _split_kv_b(name, new, t, cfg, out, back)
        else:
            out[new] = t
            back[name] = lambda g, new=new: g[new]
    return out, back


# -- metadata -----------------------------------------------------------------------------------------------------


def _rope(w: gguf.GGUFWriter, cfg: dict) -> None:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    w.add_rope_freq_base(float(cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if rope.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
        if rope.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
        if rope.get("mscale_all_dim"):
            w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])


def _mla(w: gguf.GGUFWriter, cfg: dict, family: str) -> None:
    """DeepSeek's metadata as the converter writes it since mid-2025: MLA as MQA over the latent, plus the _mla dims."""
    rank, rope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    if cfg.get("q_lora_rank"):
        w.add_q_lora_rank(cfg["q_lora_rank"])
    w.add_kv_lora_rank(rank)
    w.add_key_length(rank + rope)
    w.add_value_length(rank)
    w.add_key_length_mla(cfg["qk_nope_head_dim"] + rope)
    w.add_value_length_mla(cfg["v_head_dim"])
    w.add_rope_dimension_count(rope)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if family == "deepseek_v3" else
                             gguf.ExpertGatingFuncType.SOFTMAX)


def _routed(w: gguf.GGUFWriter, cfg: dict) -> None:
    w.add_leading_dense_block_count(cfg.get("first_k_dense_replace", 0))
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_shared_count(cfg.get("n_shared_experts", 0))
    w.add_expert_weights_scale(float(cfg.get("routed_scaling_factor", 1.0)))
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    if cfg.get("n_group") and cfg.get("topk_method") != "greedy":
        w.add_expert_group_count(cfg["n_group"])
        w.add_expert_group_used_count(cfg["topk_group"])


def _metadata(w: gguf.GGUFWriter, cfg: dict, family: str) -> None:
    mla = family in ("deepseek_v3", "deepseek_v2")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(1 if mla else cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg.get("num_local_experts") or cfg.get("num_experts") or cfg["n_routed_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("head_dim") and not mla:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    _rope(w, cfg)
    if family in ("qwen2_moe", "qwen3_moe", "gpt_oss"):
        w.add_expert_feed_forward_length(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    if family == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if family == "gpt_oss":
        w.add_sliding_window(cfg["sliding_window"])
        if cfg["swiglu_limit"] != 7.0:  # llama.cpp's default; the tiny model clamps lower, so the file says so
            w.add_swiglu_clamp_exp([float(cfg["swiglu_limit"])] * cfg["num_hidden_layers"])
    if family in ("deepseek_v3", "deepseek_v2", "glm4_moe"):
        _routed(w, cfg)
    if mla:
        _mla(w, cfg, family)
    if family == "glm4_moe":
        rope = cfg.get("rope_parameters") or {}
        partial = cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor", 1.0)
        w.add_rope_dimension_count(int(cfg["head_dim"] * partial))
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):
        if cfg.get(key) is not None:
            add(cfg[key])


# -- writing ------------------------------------------------------------------------------------------------------


def write_gguf(src: Path, out: Path, family: str, types=None, split_kv_b: bool = True, vocab=None,
               split_max_tensors: int = 0, seed: int = 0, typed_biases: bool = False) -> dict[str, torch.Tensor]:
    """Write ``src`` as GGUF to ``out``; ``types(gguf_name, array)`` picks each matrix's ggml type (default F32; one a
    type cannot hold stays F32, as llama.cpp's quantizer falls back; biases stay F32, as llama.cpp quantizes only
    ``.weight`` tensors, unless ``typed_biases``); ``vocab(writer)`` adds tokenizer metadata.
    Returns the dequantized Hugging Face state dict (write_dequantized makes it the transformers oracle)."""
    cfg = json.loads((src / "config.json").read_text())
    tensors, back = gguf_tensors(src, family, split_kv_b)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[ARCH[family]]], split_max_tensors=split_max_tensors)
    _metadata(w, cfg, family)
    if vocab is not None:
        vocab(w)
    values = {}
    for name, t in tensors.items():
        array = t.numpy()
        typed = array.ndim >= 2 and (typed_biases or not name.endswith(".bias"))
        kind = (types(name, array) if types else "F32") if typed else "F32"
        kind = kind if kind == "F32" or fits(kind, array) else "F32"
        data, values[name] = encode(array, kind, rng)
        w.add_tensor(name, data, raw_dtype=None if kind in ("F32", "F16") else Q[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = {k: torch.from_numpy(v) for k, v in values.items()}
    return {name: fn(g).contiguous() for name, fn in back.items()}


def write_gguf_and_oracle(src: Path, out_dir: Path, family: str, **kwargs) -> tuple[Path, Path]:
    """The GGUF file and a float32 checkpoint of its dequantized weights (transformers on it is the oracle)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{family}.gguf"
    state = write_gguf(src, path, family, **kwargs)
    return path, write_dequantized(src, out_dir / "dequantized", state)


def experts_as(kind: str, dense: str = "F32"):
    """A ``types`` picking ``kind`` for the stacked experts and ``dense`` for every other matrix."""
    return lambda name, array: kind if "_exps." in name else dense
