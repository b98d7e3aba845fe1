"""The model from a validated checkpoint plan: every resident tensor loaded once, in the compute dtype on the
device, and each decoder layer built from the pieces its family adapter names (attention, router, MLPs).

This is where checkpoint names meet model pieces: the family adapter (checkpoint/families.py) lists each layer's
tensors by piece, and the pieces (model/) take them by names relative to their own module, so neither layer
knows the other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from offload.checkpoint.families import Family
from offload.checkpoint.plan import CheckpointPlan
from offload.checkpoint.tensors import QuantizedTensor, TensorInfo, read_bytes, read_tensor
from offload.errors import CheckpointError
from offload.experts.kernels.linear import GGML_KINDS, BlockLinear
from offload.experts.layouts import Expert
from offload.model.attention import attention_class
from offload.model.forward import DecoderLayer, ExpertSource, MoEModel
from offload.model.routers import router_class
from offload.spec import ModelSpec
from offload.stats import Stats

# progress(stage, done, total): stage is "dense" or "experts"
ProgressFn = Callable[[str, int, int], None]


class TensorLoader:
    """Reads resident tensors from their byte ranges (checkpoint/tensors.py: safetensors and GGUF alike; GGUF blocks
    dequantized to float32); a projection made of stored parts (GPTQ attention, FP8, GGUF's split MLA kv_b) is made
    into its float32 weight here, once."""

    def __call__(self, info: TensorInfo | QuantizedTensor) -> torch.Tensor:
        if isinstance(info, QuantizedTensor):
            parts = {suffix: self(t) for suffix, t in info.parts.items()}
            return info.fmt.dense_weight(parts, info.name.removesuffix(".weight"), *info.shape)
        return read_tensor(info)


def check_finite(tensor: torch.Tensor, info: TensorInfo | QuantizedTensor) -> torch.Tensor:
    """A resident tensor holding NaN or Inf would silently turn every logit into NaN: refuse it by name at load.
    One pass over the dense bytes (memory bandwidth, once); experts are read later, and a NaN that reaches
    the logits from one of them is sampling's NumericError."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        where = info.path.name if isinstance(info, TensorInfo) else next(iter(info.parts.values())).path.name
        raise CheckpointError(f"tensor {info.name!r} in {where} holds NaN or Inf values",
                              "the file is corrupt: re-download it")
    return tensor


def _mlp(group: Mapping[str, torch.Tensor]) -> Expert:
    gate, up, down = group.values()  # gate, up, down in the order checkpoint/families.py lists them
    return Expert.dense(gate, up, down)


# DecoderLayer's norms, each the group of one tensor that Family.layer_tensors names after it
NORM_SLOTS = ("input_norm", "post_norm", "attention_out_norm", "mlp_out_norm", "dense_out_norm", "moe_norm",
              "moe_out_norm")


def _single(group: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return next(iter(group.values()))


def _norm(weight: torch.Tensor, family: Family) -> torch.Tensor:
    """An RMSNorm weight as the forward multiplies by it: zero-centred ones (Qwen3-Next's 1 + w) shifted once here."""
    return weight + family.norm_offset if family.norm_offset else weight


def build_layer(spec: ModelSpec, family: Family, layer: int, get: Callable[[str], torch.Tensor]) -> DecoderLayer:
    """Layer ``layer``'s pieces from its tensors, named once in ``Family.layer_tensors``."""
    groups = {piece: {name: get(name) for name in shapes}
              for piece, shapes in family.layer_tensors(spec, layer).items()}
    prefix = f"model.layers.{layer}"

    def relative(piece: str, to: str) -> dict[str, torch.Tensor]:
        return {name.removeprefix(f"{prefix}.{to}."): t for name, t in groups[piece].items()}  # names under ``to``

    attention = attention_class(family.layer_pieces(spec)[layer])
    weights = relative("attention", attention.module)
    weights |= {name: _norm(weights[name], family) for name in attention.norms if name in weights}
    norms = {slot: _norm(_single(groups[slot]), family) for slot in NORM_SLOTS if slot in groups}
    out = DecoderLayer(attention=attention(spec, weights), **norms)
    if "layer_scale" in groups:
        out.layer_scale = _single(groups["layer_scale"])
    if "router" in groups:
        out.router = router_class(family.router)(spec, relative("router", family.router_path))
    if "dense_mlp" in groups:
        out.dense_mlp = _mlp(groups["dense_mlp"])
    if "shared_mlp" in groups:
        out.shared_mlp = _mlp(groups["shared_mlp"])
    if "shared_gate" in groups:
        out.shared_gate = _single(groups["shared_gate"])
    return out


def kept_in_blocks(plan: CheckpointPlan) -> set[str]:
    """The resident projections of a GGUF file that a kernel computes from their own blocks at decode: lm_head and the
    attention projections of the pieces that only ever multiply by them (``block_weights``), in a type with a kernel.

    A real Q4_K_M file stores them Q4_K / Q6_K: dequantized to bf16 they would be read at 16 bits a weight every
    token, 2.5-3.5x llama.cpp's bytes (Qwen3-30B-A3B: 1.2 B of them, more than its active experts' bytes)."""
    spec, family = plan.spec, plan.family
    names = {"lm_head.weight"}
    for layer, piece in enumerate(family.layer_pieces(spec)):
        attention = attention_class(piece)
        names |= {f"model.layers.{layer}.{attention.module}.{n}" for n in getattr(attention, "block_weights", ())}
    return {name for name in names if isinstance(info := plan.dense.get(name), TensorInfo) and info.blocks
            and info.encoding in GGML_KINDS}


def _blocks(info: TensorInfo) -> BlockLinear:
    """A GGUF matrix as its kernel computes it: rows of blocks as stored (its values checked finite once)."""
    raw = read_bytes(info)
    rows, columns = info.shape
    weight = BlockLinear(raw.view(rows, -1), info.encoding, columns)
    check_finite(weight.dequantized(torch.float32), info)
    return weight


def build_model(plan: CheckpointPlan, experts: ExpertSource, stats: Stats, dtype: torch.dtype, device: torch.device,
                progress: ProgressFn | None = None, blocks: set[str] = frozenset()) -> MoEModel:
    """Load every resident tensor once, in the compute dtype on the device (those named in ``blocks`` as their GGUF
    blocks, kept_in_blocks), and assemble the layers."""
    loader = TensorLoader()
    dense: dict[str, torch.Tensor | BlockLinear] = {}
    for n, (name, info) in enumerate(plan.dense.items()):
        if name in blocks:
            dense[name] = _blocks(info)
        else:
            dense[name] = check_finite(loader(info), info).to(device=device, dtype=dtype)
        if progress:
            progress("dense", n + 1, len(plan.dense))
    spec, family = plan.spec, plan.family
    layers = [build_layer(spec, family, i, dense.__getitem__) for i in range(spec.num_layers)]
    embed = dense["model.embed_tokens.weight"]
    return MoEModel(spec, embed, layers, _norm(dense["model.norm.weight"], family), dense.get("lm_head.weight", embed),
                    experts, stats, activation=family.activation)
