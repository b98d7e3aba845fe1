"""Quantized tiny checkpoints for tests: GPTQ v1 as AutoGPTQ packs it, compressed-tensors pack-quantized as
llm-compressor writes it, each with the dequantized float32 weights that a correct reader must reproduce.

Written from the formats' descriptions with tests/reference.py's round-to-nearest and packers of their own
(numpy loops after AutoGPTQ's ``pack``, and compressed-tensors' ``pack_to_int32``); nothing here imports
offload, so a reader under test cannot share a bug with the writer.

The tiny models' matrices are 24..64 wide, so the fixtures use small groups (8 divides every one); torch's
CPU kernels need groups of 32+ and int4 rows in multiples of 16, so a runtime meets these matrices on its
portable path (dequantize, then F.linear) and the kernels are tested on real sizes in test_quant.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tests.reference import ref_dequantize, ref_rtn

EXPERT = re.compile(r"model\.layers\.\d+\..*\.experts\.\d+\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
ATTENTION = re.compile(r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight")
DENSE_MLP = re.compile(r"model\.layers\.\d+\.mlp\.(shared_expert\.)?(gate|up|down)_proj\.weight")

# the ignore list of Kimi-K2's config (shared/configs/kimi-k2.6.json) plus the routers, which it has as non-Linear
CT_IGNORE = ["re:.*self_attn.*", "re:.*shared_expert.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*", "re:.*lm_head.*",
             r"re:.*mlp\.gate$", r"re:.*block_sparse_moe\.gate$"]


def load_state_dict(src: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _copy_side_files(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and not path.name.endswith(".index.json"):
            shutil.copy(path, out / path.name)


def _write(out: Path, tensors: dict[str, torch.Tensor], quantization_config: dict | None) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2))


def write_dequantized(src: Path, out: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """A plain float32 checkpoint of the dequantized weights: transformers on it is the oracle."""
    _copy_side_files(src, out)
    _write(out, state_dict, None)
    return out


def rtn(w: torch.Tensor, bits: int, group_size: int | None, sym: bool,
        scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tests/reference.ref_rtn with the scales rounded to the dtype the format stores, and codes (and an
    asymmetric zero point) chosen for the rounded scales, so the file holds exactly what was dequantized."""
    group, maxq = group_size or w.shape[1], (1 << bits) - 1
    _, scales, zeros = ref_rtn(w, bits, group_size, sym)
    scales = scales.to(scale_dtype).float()
    x = w.float()
    if not sym:
        lo = torch.stack([x[:, c : c + group].amin(1).clamp_max(0) for c in range(0, x.shape[1], group)], 1)
        zeros = (-lo / scales).round().clamp(0, maxq)
    s, z = scales.repeat_interleave(group, 1), zeros.repeat_interleave(group, 1)
    return (x / s).round().add(z).clamp(0, maxq).to(torch.uint8), scales, zeros


# ------------------------------------------------------------------------------------------------ GPTQ


def autogptq_pack(codes: torch.Tensor, zeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoGPTQ's pack loops: qweight [in*bits/32, out] (input rows into words), qzeros [groups, out*bits/32].

    codes: [out, in], zeros: [out, groups]. Zeros are stored minus one; AutoGPTQ ORs -1 as 0xFFFFFFFF into the
    word (corrupting its neighbours for a zero of 0), so the field is masked here, as its dequantization masks.
    """
    per = 32 // bits
    intweight = codes.t().numpy().astype(np.uint32)  # [in, out]
    qweight = np.zeros((intweight.shape[0] // per, intweight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(per):
            qweight[row] |= intweight[row * per + j] << (bits * j)
    stored = ((zeros.t().numpy().astype(np.int64) - 1) & ((1 << bits) - 1)).astype(np.uint32)  # [groups, out]
    qzeros = np.zeros((stored.shape[0], stored.shape[1] // per), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(per):
            qzeros[:, col] |= stored[:, col * per + j] << (bits * j)
    return torch.from_numpy(qweight.view(np.int32).copy()), torch.from_numpy(qzeros.view(np.int32).copy())


def gptq_config(bits: int, group_size: int | None, sym: bool) -> dict:
    """quantization_config as AutoGPTQ writes it (cf. shared/configs/qwen3-30b-a3b-gptq-int4.json)."""
    return {"bits": bits, "checkpoint_format": "gptq", "damp_percent": 0.01, "desc_act": False,
            "group_size": -1 if group_size is None else group_size, "model_file_base_name": None,
            "model_name_or_path": None, "quant_method": "gptq", "static_groups": False, "sym": sym,
            "true_sequential": True}


def gptq_targets(name: str) -> bool:
    """Experts, attention projections, shared experts and dense MLPs; routers, norms, embeddings, lm_head stay."""
    return any(p.fullmatch(name) for p in (EXPERT, ATTENTION, DENSE_MLP))


def write_gptq(src: Path, out: Path, bits: int = 4, group_size: int | None = 8, sym: bool = True,
               targets=gptq_targets) -> dict[str, torch.Tensor]:
    """Quantize ``src``'s chosen linear weights (RTN, fp16 scales) into a GPTQ checkpoint at ``out``.

    -> the dequantized float32 state dict of the whole model (unquantized tensors as they were).
    """
    _copy_side_files(src, out)
    tensors, dequantized = {}, {}
    for name, w in load_state_dict(src).items():
        if not targets(name):
            tensors[name] = dequantized[name] = w
            continue
        codes, scales, zeros = rtn(w, bits, group_size, sym, torch.float16)  # GPTQ stores fp16 scales
        prefix = name.removesuffix(".weight")
        qweight, qzeros = autogptq_pack(codes, zeros, bits)
        in_ = w.shape[1]
        group = group_size or in_
        tensors |= {f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros, f"{prefix}.scales": scales.t().half(),
                    f"{prefix}.g_idx": (torch.arange(in_) // group).to(torch.int32)}
        dequantized[name] = ref_dequantize(codes, scales, zeros, group_size)
    _write(out, tensors, gptq_config(bits, group_size, sym))
    return dequantized


# ------------------------------------------------------------------------------------------------ compressed-tensors


def ct_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [R, C] (unsigned: signed + 2^(bits-1)) -> int32 [R, ceil(C*bits/32)], element i at bit i*bits."""
    per = 32 // bits
    rows, cols = codes.shape
    words = -(-cols // per)
    padded = np.zeros((rows, words * per), dtype=np.uint32)
    padded[:, :cols] = codes.numpy()
    out = np.zeros((rows, words), dtype=np.uint32)
    for j in range(per):
        out |= padded[:, j::per] << (bits * j)
    return torch.from_numpy(out.view(np.int32).copy())


def ct_config(bits: int, group_size: int | None, sym: bool, ignore: list[str]) -> dict:
    """quantization_config of a pack-quantized checkpoint (cf. shared/configs/kimi-k2.6.json)."""
    weights = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": group_size,
               "num_bits": bits, "observer": "minmax", "observer_kwargs": {},
               "strategy": "channel" if group_size is None else "group", "symmetric": sym, "type": "int"}
    return {"config_groups": {"group_0": {"input_activations": None, "output_activations": None,
                                          "targets": ["Linear"], "weights": weights}},
            "format": "pack-quantized", "ignore": ignore, "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed"}


def write_compressed_tensors(src: Path, out: Path, bits: int = 4, group_size: int | None = 8, sym: bool = True,
                             scale_dtype: torch.dtype = torch.bfloat16,
                             targets=EXPERT.fullmatch) -> dict[str, torch.Tensor]:
    """Quantize ``src``'s routed experts (RTN) into a pack-quantized checkpoint at ``out``, the rest left as is.

    -> the dequantized float32 state dict of the whole model.
    """
    _copy_side_files(src, out)
    tensors, dequantized = {}, {}
    for name, w in load_state_dict(src).items():
        if not targets(name):
            tensors[name] = dequantized[name] = w
            continue
        codes, scales, zeros = rtn(w, bits, group_size, sym, scale_dtype)
        prefix = name.removesuffix(".weight")
        tensors |= {f"{prefix}.weight_packed": ct_pack(codes, bits),
                    f"{prefix}.weight_scale": scales.to(scale_dtype),
                    f"{prefix}.weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}
        if not sym:  # the zero point is packed along the output dimension
            tensors[f"{prefix}.weight_zero_point"] = ct_pack(zeros.t().to(torch.uint8), bits).t().contiguous()
        dequantized[name] = ref_dequantize(codes, scales, zeros, group_size)
    _write(out, tensors, ct_config(bits, group_size, sym, CT_IGNORE))
    return dequantized


# ------------------------------------------------------------------------------------------------ MXFP4 (gpt-oss)

FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (blocks uint8 [out, in/32, 16], scales uint8 [out, in/32], dequantized float32 [out, in]).

    Each group of 32 inputs shares a power of two chosen so its largest magnitude fits FP4's 6; each value
    becomes the nearest E2M1 code (two per byte, low nibble first).
    """
    out, inn = w.shape
    g = w.float().reshape(out, inn // 32, 32)
    amax = g.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = g / torch.exp2(exp)
    codes = (scaled[..., None] - FP4[:8]).abs().argmin(-1)            # magnitude code 0..7
    codes = torch.where(scaled < 0, codes + 8, codes).to(torch.uint8)  # sign bit
    deq = FP4[codes.long()] * torch.exp2(exp)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8).squeeze(-1), deq.reshape(out, inn)


def write_mxfp4(src: Path, out: Path) -> dict[str, torch.Tensor]:
    """gpt-oss's released layout from a transformers-saved one: experts as MXFP4 blocks and scales in (out, in)
    orientation, biases kept; everything else as it was. -> the dequantized state dict (transformers' layout)."""
    _copy_side_files(src, out)
    tensors, dequantized = {}, {}
    for name, w in load_state_dict(src).items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = dequantized[name] = w
            continue
        pieces = [mxfp4_quantize(w[e].t()) for e in range(w.shape[0])]  # [out, in] per expert
        tensors[f"{name}_blocks"] = torch.stack([p[0] for p in pieces])
        tensors[f"{name}_scales"] = torch.stack([p[1] for p in pieces])
        dequantized[name] = torch.stack([p[2].t() for p in pieces]).contiguous()
    _write(out, tensors, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    return dequantized


# ------------------------------------------------------------------------------------------------ FP8 blocks

FP8_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj"
                        r"|o_proj)|mlp\.(experts\.\d+\.|shared_experts\.)?(gate|up|down)_proj)\.weight")


def fp8_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (float8_e4m3fn weight, float32 scale_inv per block, dequantized float32)."""
    out, inn = w.shape
    rows, cols = -(-out // block[0]), -(-inn // block[1])
    scale = torch.zeros(rows, cols)
    for r in range(rows):
        for c in range(cols):
            tile = w[r * block[0]:(r + 1) * block[0], c * block[1]:(c + 1) * block[1]]
            scale[r, c] = tile.abs().max().clamp_min(1e-12) / 448.0  # e4m3's largest finite value
    full = scale.repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inn]
    q = (w.float() / full).to(torch.float8_e4m3fn)
    return q, scale, q.float() * full


def write_fp8(src: Path, out: Path, block: tuple[int, int] = (16, 16), targets=FP8_LINEAR.fullmatch,
              fmt: str = "e4m3") -> dict[str, torch.Tensor]:
    """DeepSeek-V3's released layout: every linear projection (attention, experts, shared experts, dense MLPs)
    as float8_e4m3fn with ``weight_scale_inv`` blocks; routers, norms, embeddings, lm_head as they were.
    ``fmt``: quantization_config's spelling of the FP8 type (MiniMax-M2 writes "float8_e4m3fn")."""
    _copy_side_files(src, out)
    tensors, dequantized = {}, {}
    for name, w in load_state_dict(src).items():
        if not targets(name):
            tensors[name] = dequantized[name] = w
            continue
        q, scale, deq = fp8_quantize(w, block)
        tensors[name], tensors[name.removesuffix("weight") + "weight_scale_inv"] = q, scale
        dequantized[name] = deq
    _write(out, tensors, {"quant_method": "fp8", "fmt": fmt, "activation_scheme": "dynamic",
                          "weight_block_size": list(block)})
    return dequantized


def tiny_qwen3_moe(out: Path, hidden: int = 64, intermediate: int = 64) -> Path:
    """A float32 Qwen3-MoE of 2 layers x 4 experts (top-2) saved by transformers at ``out``: ``hidden`` x
    ``intermediate`` experts (64 x 64 takes int4 groups of 32), seeded."""
    import transformers

    config = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=2 * hidden,
                                         moe_intermediate_size=intermediate, num_experts=4, num_experts_per_tok=2,
                                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                         norm_topk_prob=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(out)
    return out
