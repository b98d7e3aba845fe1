"""A GGUF file as a checkpoint of one of offload's families: its architecture's metadata in config.json's spellings
(so the family adapters read it as they read config.json), its tensor names mapped to the adapters' Hugging Face
names, and llama.cpp's conventions undone where they differ from transformers':

- ``llama`` files with experts (Mixtral) have q and k rows permuted so that RoPE rotates adjacent pairs (llama.cpp's
  "normal" rope); rotating the pairs (``rope_interleave``) of the permuted rows gives exactly the rotation of the
  original rows, so the rows are kept and the pairs rotated;
- ``deepseek2`` files written since mid-2025 split MLA's kv_b into ``attn_k_b`` [heads, rank, nope] (transposed)
  and ``attn_v_b`` [heads, v, rank]; kv_b is put back together at load (older files keep ``attn_kv_b``);
- dims are listed innermost first (checkpoint/gguf.py reverses them), experts are stacked per layer
  (``ffn_gate_exps``...), and an absent ``output.weight`` means tied embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from offload.checkpoint.families import FAMILIES, Family
from offload.checkpoint.gguf import GgufFile, read_gguf
from offload.checkpoint.source import Source
from offload.checkpoint.tensors import FLOAT_DTYPES, QuantizedTensor, TensorInfo, check_tensor
from offload.errors import CheckpointError, UnsupportedModelError
from offload.experts.formats.gguf import GgufFormat
from offload.registry import lookup

# Hugging Face module (under model.layers.N.) -> GGUF tensor (under blk.N.); a module maps its .weight and .bias.
_LAYER_MODULES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.kv_b_proj": "attn_kv_b",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
# the shared expert's module: Qwen2-MoE's gated one is singular, DeepSeek's and GLM's plain ones plural
_SHARED = {"gated": "mlp.shared_expert", "plain": "mlp.shared_experts", "none": "mlp.shared_expert"}
_LAYER_TENSORS = {"self_attn.sinks": "attn_sinks.weight", "mlp.gate.e_score_correction_bias": "exp_probs_b.bias"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_BLK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


class Meta:
    """GGUF metadata, with ``{arch}.`` keys asked for by their tail ("embedding_length")."""

    def __init__(self, file: GgufFile) -> None:
        self.kv, self.arch, self.tensors = file.metadata, file.architecture, file.tensors

    def get(self, key: str, default: Any = None) -> Any:
        return self.kv.get(f"{self.arch}.{key}", default)

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"GGUF metadata lacks {self.arch}.{key}", "the file is incomplete: re-download it")
        return value

    def has(self, pattern: str) -> bool:
        """Whether a tensor name matches ``pattern`` (a regex over GGUF names)."""
        return any(re.fullmatch(pattern, name) for name in self.tensors)


@dataclass(frozen=True)
class GgufArch:
    """One ``general.architecture``: the family it is, how its metadata reads as config.json, its tensor names."""

    name: str
    family: Callable[[Meta], str]              # the family adapter's name (deepseek2 is V2 or V3 by its gating)
    config: Callable[[Meta], dict]             # architecture-only config.json fields
    post_norm: str = "ffn_norm"                # GGUF name of post_attention_layernorm
    permuted_qk: bool = False                  # q/k rows permuted for llama.cpp's rotary (the module docstring)


def _llama(m: Meta) -> dict:
    if m.get("expert_count") is None:
        raise UnsupportedModelError(f"{m.arch} GGUF without experts is a dense model",
                                    "offload runs Mixture-of-Experts models (llama files with experts: Mixtral)")
    return {"rope_interleave": True}  # q/k rows permuted by the converter: rotate adjacent pairs (module docstring)


def _qwen3moe(m: Meta) -> dict:
    return {"norm_topk_prob": bool(m.get("expert_weights_norm", True))}  # llama.cpp always renormalises qwen3moe


def _qwen2moe(m: Meta) -> dict:
    return {"shared_expert_intermediate_size": int(m.get("expert_shared_feed_forward_length", 0)),
            "norm_topk_prob": bool(m.get("expert_weights_norm", False))}


def _gpt_oss(m: Meta) -> dict:
    layers = int(m.need("block_count"))
    window = m.get("attention.sliding_window")
    clamp = m.get("swiglu_clamp_exp", 7.0)  # llama.cpp's fixed 7.0 unless the file says (per layer)
    # llama.cpp's swa pattern 2: even layers slide, as gpt-oss's layer_types; YaRN untruncated, as its config says
    return {"sliding_window": window, "swiglu_limit": float(max(clamp) if isinstance(clamp, list) else clamp),
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
            "rope_scaling": {**(_rope_scaling(m) or {}), "truncate": False}}


def _deepseek_family(m: Meta) -> str:
    return "deepseek_v3" if int(m.get("expert_gating_func", 1)) == 2 else "deepseek_v2"  # 2: sigmoid (V3, Kimi-K2)


def _deepseek2(m: Meta) -> dict:
    rope = int(m.need("rope.dimension_count"))
    key = int(m.get("attention.key_length_mla") or m.need("attention.key_length"))
    return {"q_lora_rank": m.get("attention.q_lora_rank"), "kv_lora_rank": int(m.need("attention.kv_lora_rank")),
            "qk_rope_head_dim": rope, "qk_nope_head_dim": key - rope,
            "v_head_dim": int(m.get("attention.value_length_mla") or m.need("attention.value_length")),
            "num_key_value_heads": int(m.need("attention.head_count")), **_routed(m)}


def _glm4moe(m: Meta) -> dict:
    head_dim = int(m.need("attention.key_length"))
    return {"partial_rotary_factor": int(m.get("rope.dimension_count", head_dim)) / head_dim,
            "use_qk_norm": m.has(r"blk\.\d+\.attn_q_norm\.weight"), **_routed(m)}


def _routed(m: Meta) -> dict:
    """DeepSeek-style routing and layers: shared experts, leading dense layers, groups, scale, renormalisation."""
    return {"n_shared_experts": int(m.get("expert_shared_count", 0)),
            "first_k_dense_replace": int(m.get("leading_dense_block_count", 0)),
            "routed_scaling_factor": float(m.get("expert_weights_scale", 1.0)),
            "norm_topk_prob": bool(m.get("expert_weights_norm", False)),
            "n_group": int(m.get("expert_group_count", 1) or 1),
            "topk_group": int(m.get("expert_group_used_count", 1) or 1)}


def _fixed(family: str) -> Callable[[Meta], str]:
    return lambda m: family


ARCHES: dict[str, GgufArch] = {a.name: a for a in (
    GgufArch("llama", _fixed("mixtral"), _llama, permuted_qk=True),
    GgufArch("qwen2moe", _fixed("qwen2_moe"), _qwen2moe),
    GgufArch("qwen3moe", _fixed("qwen3_moe"), _qwen3moe),
    GgufArch("olmoe", _fixed("olmoe"), lambda m: {"norm_topk_prob": False}),
    GgufArch("gpt-oss", _fixed("gpt_oss"), _gpt_oss, post_norm="post_attention_norm"),
    GgufArch("deepseek2", _deepseek_family, _deepseek2),
    GgufArch("glm4moe", _fixed("glm4_moe"), _glm4moe, post_norm="post_attention_norm"),
)}


def _rope_scaling(m: Meta) -> dict | None:
    """rope.scaling.* as config.json's rope_scaling (linear or YaRN; DeepSeek's mscale from its log multiplier)."""
    kind = str(m.get("rope.scaling.type", "none"))
    if kind not in ("linear", "yarn"):
        return None
    out = {"rope_type": kind, "factor": float(m.get("rope.scaling.factor", 1.0))}
    if kind == "yarn":
        out["original_max_position_embeddings"] = int(m.get("rope.scaling.original_context_length", 0))
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if m.get(f"rope.scaling.{key}") is not None:
                out[name] = float(m.get(f"rope.scaling.{key}"))
        if m.get("rope.scaling.yarn_log_multiplier") is not None:  # llama.cpp writes 0.1 x DeepSeek's mscale_all_dim
            out["mscale"] = out["mscale_all_dim"] = float(m.get("rope.scaling.yarn_log_multiplier")) / 0.1
    return out


def _largest(value: Any) -> int:
    """A per-layer list (some files give head counts or FFN sizes per layer) or one number: its largest value."""
    return int(max(value)) if isinstance(value, list) else int(value)


def _token_ids(kv: Mapping[str, Any]) -> dict:
    eos = [kv.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]  # llama.cpp stops at each of them
    return {"bos_token_id": kv.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": list(dict.fromkeys(int(e) for e in eos if e is not None)) or None,
            "pad_token_id": kv.get("tokenizer.ggml.padding_token_id")}


def _dtype(m: Meta) -> str:
    """The compute dtype a file implies: its float type if attention is stored in one, else bfloat16."""
    info = m.tensors.get("blk.0.attn_output.weight") or m.tensors.get("token_embd.weight")
    if info is not None and not info.blocks:
        return str(info.dtype).removeprefix("torch.")
    return "bfloat16"


def gguf_config(m: Meta, arch: GgufArch, family: Family) -> dict:
    """The file's metadata as config.json's fields (the spellings the family adapters read)."""
    heads = int(m.need("attention.head_count"))
    ffn = _largest(m.get("feed_forward_length", 0))
    cfg = {"architectures": [family.architectures[0]], "model_type": family.model_types[0],
           "hidden_size": int(m.need("embedding_length")), "num_attention_heads": heads,
           "num_hidden_layers": int(m.need("block_count")) - int(m.get("nextn_predict_layers", 0)),
           "num_key_value_heads": _largest(m.get("attention.head_count_kv", heads)),
           "vocab_size": m.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in m.tensors else
           int(m.need("vocab_size")), "max_position_embeddings": int(m.get("context_length", 4096)),
           "rms_norm_eps": float(m.get("attention.layer_norm_rms_epsilon", 1e-6)),
           "rope_theta": float(m.get("rope.freq_base", 10000.0)), "rope_scaling": _rope_scaling(m),
           "num_local_experts": int(m.need("expert_count")), "num_experts_per_tok": int(m.need("expert_used_count")),
           "intermediate_size": ffn, "moe_intermediate_size": int(m.get("expert_feed_forward_length") or ffn),
           "tie_word_embeddings": "output.weight" not in m.tensors, "hidden_act": "silu", "torch_dtype": _dtype(m),
           "attention_bias": m.has(r"blk\.\d+\.attn_(q|q_a|kv_a_mqa)\.bias"), **_token_ids(m.kv)}
    if m.get("attention.key_length") is not None:
        cfg["head_dim"] = int(m.get("attention.key_length"))
    cfg.update(arch.config(m))
    return cfg


# -- names -----------------------------------------------------------------------------------------------------


def _layer_names(arch: GgufArch, family: Family) -> dict[str, str]:
    """Hugging Face tensor (under model.layers.N.) -> GGUF tensor (under blk.N.) for this architecture."""
    shared = _SHARED[family.shared_expert]
    modules = {**_LAYER_MODULES, "post_attention_layernorm": arch.post_norm,
               f"{family.moe_prefix}.{family.router_module}": "ffn_gate_inp",
               **{f"{shared}.{p}_proj": f"ffn_{p}_shexp" for p in ("gate", "up", "down")}}
    return {**{f"{hf}.{s}": f"{g}.{s}" for hf, g in modules.items() for s in ("weight", "bias")}, **_LAYER_TENSORS}


def gguf_name(hf_name: str, layer_names: Mapping[str, str]) -> str:
    """The GGUF name of a tensor the family adapter asks for (errors name what the file would hold)."""
    m = _LAYER_RE.match(hf_name)
    if m is None:
        return _GLOBAL.get(hf_name, hf_name)
    return f"blk.{m[1]}.{layer_names.get(m[2], m[2])}"


def _hf_names(tensors: Mapping[str, TensorInfo], layer_names: Mapping[str, str]) -> dict[str, TensorInfo]:
    """The file's tensors by the names the family adapter asks for; stacked experts and anything else unmapped keep
    their GGUF names (the stacked storage asks for those)."""
    to_hf_layer = {g: hf for hf, g in layer_names.items()}
    to_hf_global = {g: hf for hf, g in _GLOBAL.items()}
    out = {}
    for name, info in tensors.items():
        m = _BLK_RE.match(name)
        if m is not None and m[2] in to_hf_layer:
            out[f"model.layers.{m[1]}.{to_hf_layer[m[2]]}"] = info
        else:
            out[to_hf_global.get(name, name)] = info
    return out


# -- experts and MLA -------------------------------------------------------------------------------------------


def expert_format(file: GgufFile) -> GgufFormat:
    """Each MoE layer's ggml types of gate, up and down, read off its stacked tensors."""
    layers = sorted({int(m[1]) for name in file.tensors
                     if (m := re.match(r"^blk\.(\d+)\.ffn_down_exps\.weight$", name))})
    if not layers:
        raise UnsupportedModelError(f"{file.path} has no stacked experts (blk.N.ffn_down_exps.weight)",
                                    "offload runs Mixture-of-Experts models")
    fused = f"blk.{layers[0]}.ffn_gate_up_exps.weight" in file.tensors
    types = []
    for n in layers:
        gate_up = ["gate_up", "gate_up"] if fused else ["gate", "up"]
        names = [f"blk.{n}.ffn_{p}_exps.weight" for p in (*gate_up, "down")]
        missing = [name for name in names if name not in file.tensors]
        if missing:
            raise CheckpointError(f"{file.path}: tensor {missing[0]!r} is missing",
                                  "the file is incomplete: re-download it")
        types.append((n, tuple(file.tensors[name].encoding for name in names)))
    bias = f"blk.{layers[0]}.ffn_down_exps.bias" in file.tensors
    for name, info in file.tensors.items() if bias else ():  # llama.cpp quantizes only .weight tensors
        if re.match(r"^blk\.\d+\.ffn_\w+_exps\.bias$", name) and info.encoding not in ("F32", "F16", "BF16"):
            raise UnsupportedModelError(f"{file.path}: expert bias {name!r} is stored as {info.encoding}",
                                        "offload reads expert biases in F32, F16 or BF16 (as llama.cpp writes them)")
    return GgufFormat(tuple(types), bias=bias, fused_gate_up=fused)  # type: ignore[arg-type]


@dataclass(frozen=True)
class MlaKvB:
    """kv_b_proj [heads x (nope + v), rank] put back together from llama.cpp's attn_k_b [heads, rank, nope] (k's part,
    transposed) and attn_v_b [heads, v, rank]: the inverse of its converter's split."""

    def dense_weight(self, tensors: Mapping[str, torch.Tensor], name: str, out_features: int,
                     in_features: int) -> torch.Tensor:
        k_b, v_b = tensors["k_b"].float(), tensors["v_b"].float()
        return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(out_features, in_features)


def _split_kv_b(tensors: Mapping[str, TensorInfo], cfg: dict) -> dict[str, QuantizedTensor]:
    """kv_b of every layer that stores only attn_k_b / attn_v_b."""
    heads, rank = cfg["num_attention_heads"], cfg.get("kv_lora_rank")
    out = {}
    for name in tensors:
        m = re.match(r"^blk\.(\d+)\.attn_k_b\.weight$", name)
        kv_b = f"model.layers.{m[1]}.self_attn.kv_b_proj.weight" if m else ""
        if m is None or kv_b in tensors or f"blk.{m[1]}.attn_v_b.weight" not in tensors:
            continue
        parts = {"k_b": tensors[name], "v_b": tensors[f"blk.{m[1]}.attn_v_b.weight"]}
        out[kv_b] = QuantizedTensor(kv_b, parts, MlaKvB(), (heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]),
                                                              rank))
    return out


def _checker(path: Path, layer_names: Mapping[str, str]):
    """check_tensor, but a missing tensor is named as the GGUF file would hold it."""
    def check(tensors: Mapping[str, TensorInfo], name: str, shape: tuple[int, ...],
              dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> TensorInfo:
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {gguf_name(name, layer_names)!r} is missing",
                                  "the file does not match its own metadata: re-download it")
        return check_tensor(tensors, name, shape, dtypes)
    return check


def gguf_source(path: Path) -> Source:
    """A .gguf file (the first part of a split set) as the plan's Source."""
    file = read_gguf(path)
    arch = lookup(ARCHES, file.architecture or "(none)", f"GGUF architecture in {path.name}", UnsupportedModelError)
    meta = Meta(file)
    family = FAMILIES[arch.family(meta)]
    cfg = gguf_config(meta, arch, family)
    layer_names = _layer_names(arch, family)
    tensors = _hf_names(file.tensors, layer_names)
    return Source(path, cfg, f"{path} (GGUF metadata)", replace(family, expert_storage=("stacked",)), tensors,
                  _checker(path, layer_names), expert_format(file), None, _split_kv_b(tensors, cfg), file.metadata)
