"""GGUF experts (llama.cpp, ollama, LM Studio files): every family's experts stacked per layer, one ggml type each.

A layer's experts are ``ffn_gate_exps`` / ``ffn_up_exps`` [E, inter, hidden] and ``ffn_down_exps`` [E, hidden, inter]
(or gate and up as one ``ffn_gate_up_exps`` [E, 2 x inter, hidden], gate rows first), with biases ``.bias`` [E, out]
for gpt-oss. Rows of every ggml type are independent, so expert e is slice e of each tensor and is read from the file
as it lies, in the file's own blocks (experts/formats/ggml.py). The types can differ per projection and per layer
(Q4_K_M keeps some layers' down projections in Q6_K), so the format is per layer (``layer_format``); the disk and RAM
tiers keep each layer's blocks. A cache slot holds the same blocks where every type has a kernel (Q8_0, Q4_0, Q4_K,
Q6_K, MXFP4: ggml.py's ``native``) and activations are int8, sized for the largest layer when layers differ (SlotUnion);
otherwise the expert dequantized once per miss into the compute dtype.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from offload.errors import UnsupportedModelError
from offload.experts.formats.base import FLOATS, ExpertFormat
from offload.experts.formats.ggml import ggml_type
from offload.experts.kernels.linear import BlockLinear
from offload.experts.layouts import (
    DenseMatrix,
    ExpertLayout,
    Linear,
    Matrix,
    Part,
    SlotLayout,
    SlotUnion,
    pack_matrices,
    packed_layout,
    projection_shapes,
    stacks,
)

if TYPE_CHECKING:
    from offload.spec import ModelSpec

LayerTypes = tuple[str, str, str]  # the ggml types of gate, up and down in one layer


@dataclass(frozen=True)
class GgufMatrix:
    """One projection in a ggml type: its rows' bytes ``w`` ([out, bytes per row] uint8 for block types, [out, in] of
    the dtype for F32/F16/BF16) and, for gpt-oss, a float bias [out]."""

    w: Part
    kind: str          # the ggml type's name
    in_features: int
    b: Part | None = None
    activations: str = "float32"  # --quant-activations: "int8" computes a type with a kernel from its blocks

    @property
    def parts(self) -> tuple[Part, ...]:
        return (self.w,) if self.b is None else (self.w, self.b)

    def signature(self) -> tuple:
        return ("gguf", self.kind, self.w.shape, None if self.b is None else self.b.dtype)

    def dense(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float32 weight [out, in] (one dequantization) and the bias, for a dense slot to cast once."""
        weight = ggml_type(self.kind).dequantize(self.w.view(buf), (self.w.shape[0], self.in_features))
        return weight, None if self.b is None else self.b.view(buf)

    def bind(self, buf: torch.Tensor) -> Linear:
        """The kernel on the blocks where the type has one and activations are int8 (a native slot, or the RAM tier's
        host copy in hybrid's CPU branch); else dequantize per matmul (only the host copy computes that way)."""
        if self._native(buf):
            blocks = BlockLinear(self.w.view(buf), self.kind, self.in_features)
            if self.b is None:
                return blocks
            bias = self.b.view(buf)
            return lambda x: blocks(x) + bias.to(x.dtype)

        def linear(x: torch.Tensor) -> torch.Tensor:
            weight, bias = self.dense(buf)
            return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return linear

    def stacked(self, below: Matrix, buf: torch.Tensor) -> Linear | None:
        """This projection and ``below`` (gate and up) as one kernel call when their blocks lie back to back."""
        if (isinstance(below, GgufMatrix) and self._native(buf) and below.kind == self.kind
                and self.b is None and below.b is None and stacks(self.w, below.w)):
            both = Part(self.w.offset, self.w.dtype, (2 * self.w.shape[0], self.w.shape[1]))
            return BlockLinear(both.view(buf), self.kind, self.in_features)
        return None

    def _native(self, buf: torch.Tensor) -> bool:
        return ggml_type(self.kind).native and self.activations == "int8" and buf.device.type == "cpu"

    def convert_from(self, src: Matrix, src_buf: torch.Tensor, buf: torch.Tensor) -> None:
        """The same blocks, moved (the RAM tier packs what the disk read); a bias cast to this layout's float32."""
        if not isinstance(src, GgufMatrix) or (src.kind, src.w.shape, src.b is None) != (self.kind, self.w.shape,
                                                                                         self.b is None):
            raise TypeError(f"a {self.kind} GGUF matrix cannot hold {type(src).__name__} bytes")
        for have, want in zip(src.parts, self.parts, strict=True):
            want.view(buf).copy_(have.view(src_buf))


def _weight_part(kind: str, out_features: int, in_features: int) -> Part:
    row = ggml_type(kind)
    if row.dtype is not None:
        return Part(0, row.dtype, (out_features, in_features))
    return Part(0, torch.uint8, (out_features, row.row_nbytes(in_features)))


def _summary(layers: Sequence[tuple[int, LayerTypes]]) -> str:
    """"gate Q4_K, up Q4_K, down Q6_K x20 / Q4_K x28": each projection's types with their layer counts."""
    out = []
    for i, proj in enumerate(("gate", "up", "down")):
        counts = Counter(types[i] for _, types in layers)
        if len(counts) == 1:
            out.append(f"{proj} {next(iter(counts))}")
        else:
            out.append(f"{proj} " + " / ".join(f"{kind} x{n}" for kind, n in counts.most_common()))
    return ", ".join(out)


@dataclass(frozen=True)
class GgufFormat(ExpertFormat):
    """A GGUF file's experts: per MoE layer, the ggml types of gate, up and down (and whether experts have biases,
    and gate/up fused into one tensor)."""

    layers: tuple[tuple[int, LayerTypes], ...]
    bias: bool = False
    fused_gate_up: bool = False
    activations: str = "float32"  # for_activations: what the layouts it makes compute with

    def __post_init__(self) -> None:
        for _, types in self.layers:
            for kind in types:
                ggml_type(kind)  # an unknown type fails here, by name

    @property
    def name(self) -> str:
        return f"gguf ({_summary(self.layers)})"

    def for_activations(self, activations: str) -> GgufFormat:
        return replace(self, activations=activations)

    def layer_format(self, layer: int) -> GgufFormat:
        return replace(self, layers=tuple((n, t) for n, t in self.layers if n == layer))

    @property
    def _types(self) -> LayerTypes:
        kinds = {types for _, types in self.layers}
        if len(kinds) != 1:
            raise UnsupportedModelError(f"{self.name}: ask layer_format(layer) for one layer's layout")
        return next(iter(kinds))

    # -- the file's tensors -------------------------------------------------------------------------------------
    def tensor_suffixes(self) -> tuple[str, ...]:
        return ("weight", "bias") if self.bias else ("weight",)

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        return {"weight": (out_features, in_features), **({"bias": (out_features,)} if self.bias else {})}

    def dtypes(self, suffix: str) -> tuple[torch.dtype, ...]:
        return FLOATS  # block tensors are float32 once decoded (checkpoint/tensors.py)

    def source_matrix(self, parts: Sequence[Part], out_features: int, in_features: int) -> Matrix:
        raise UnsupportedModelError("GGUF experts are stacked per layer, never one tensor per expert")

    def fused_tensors(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """A layer's stacked tensors, after ``blk.N.``: weights [E, out, in], then gpt-oss's biases [E, out]."""
        e = spec.num_experts
        (i, h), _, (h2, i2) = projection_shapes(spec)
        weights = {"ffn_gate_up_exps": (e, 2 * i, h)} if self.fused_gate_up else \
            {"ffn_gate_exps": (e, i, h), "ffn_up_exps": (e, i, h)}
        weights["ffn_down_exps"] = (e, h2, i2)
        names = {f"{name}.weight": shape for name, shape in weights.items()}
        if self.bias:
            names |= {f"{name}.bias": shape[:2] for name, shape in weights.items()}
        return names

    def fused_layout(self, parts: Sequence[Part]) -> ExpertLayout:
        """One expert's slices (in ``fused_tensors`` order) as gate, up and down matrices of this layer's types."""
        n = 2 if self.fused_gate_up else 3
        weights, biases = parts[:n], (parts[n:] if self.bias else [None] * n)
        if self.fused_gate_up:
            weights, biases = _split_rows(weights[0]) + [weights[1]], _split_rows(biases[0]) + [biases[1]]
        return ExpertLayout(*(GgufMatrix(w, kind, _in_features(w, kind), b, self.activations)
                              for w, kind, b in zip(weights, self._types, biases, strict=True)))

    # -- where the bytes live and compute ------------------------------------------------------------------------
    def host_layout(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                    activations: str) -> ExpertLayout:
        """The layer's own blocks, gate | up | down: what the RAM tier holds (the file's bytes per weight)."""
        return pack_matrices([GgufMatrix(_weight_part(kind, out, inn), kind, inn,
                                         Part(0, torch.float32, (out,)) if self.bias else None, activations)
                              for kind, (out, inn) in zip(self._types, projection_shapes(spec), strict=True)])

    def native(self, device: torch.device, activations: str) -> bool:
        """Whether slots hold the file's blocks and compute from them: on the CPU, int8 activations, and every
        layer's gate, up and down in types with a kernel (ggml.py's ``native`` rows)."""
        return (device.type == "cpu" and activations == "int8"
                and all(ggml_type(kind).native for _, types in self.layers for kind in types))

    def slot_layout(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                    activations: str) -> SlotLayout:
        """The blocks as the file stores them where the types compute natively (a disk miss is one read per
        projection, no conversion; layers of different types share slots sized for the largest); else a slot of
        the compute dtype, filled by one dequantization per miss (the blocks are decoded on the host, and the same
        slot serves every layer whatever its types)."""
        if self.native(device, activations):
            layouts = (self.layer_format(n).host_layout(spec, dtype, device, activations) for n, _ in self.layers)
            distinct = list({tuple(m.signature() for m in x.matrices): x for x in layouts}.values())
            return distinct[0] if len(distinct) == 1 else SlotUnion(tuple(distinct))
        if not self.bias:
            return packed_layout(spec.hidden_size, spec.expert_intermediate_size, dtype)
        return pack_matrices([DenseMatrix(Part(0, dtype, (out, inn)), Part(0, dtype, (out,)))
                              for out, inn in projection_shapes(spec)])


def _split_rows(part: Part | None) -> list[Part | None]:
    """gate and up out of a fused [2 x inter, ...] slice: the first half of its rows, then the second."""
    if part is None:
        return [None, None]
    half = (part.shape[0] // 2, *part.shape[1:])
    first = Part(part.offset, part.dtype, half)
    return [first, Part(first.end, part.dtype, half)]


def _in_features(w: Part, kind: str) -> int:
    """Columns of a weight whose rows are [bytes] of blocks (or plain elements)."""
    row = ggml_type(kind)
    if row.dtype is not None:
        return w.shape[-1]
    return w.shape[-1] // row.type_size * row.block_size
