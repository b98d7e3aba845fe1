"""How a family's checkpoint lays its experts out in tensors: one module per expert (Mixtral, Qwen,
DeepSeek, GLM: ``experts.N.gate_proj.*``), or one fused tensor per layer and kind holding every expert
(gpt-oss: ``experts.gate_up_proj`` [E, hidden, 2 x inter], or its MXFP4 ``_blocks`` / ``_scales``; Qwen3.5 and
Gemma-4 on the hub: ``experts.gate_up_proj`` [E, 2 x inter, hidden], gate rows then up rows, and ``down_proj``;
every GGUF file: ``blk.N.ffn_gate_exps.weight`` [E, inter, hidden] and its kin). A family lists the storages
its checkpoints come in; a checkpoint's is the first whose tensors it has.

Either way an expert is a list of byte ranges in the files, so the disk tier reads it with one read
per run of adjacent ranges (a fused tensor's slice e is contiguous), and a layout of matrices in the
checkpoint's format, which the slot layout converts from. Which tensors and matrices those are is the
format's to say (experts/formats/); a storage only knows where they are named.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from offload.checkpoint.tensors import TensorInfo
from offload.errors import UnsupportedModelError
from offload.experts.formats.base import ExpertFormat
from offload.experts.layouts import DenseMatrix, ExpertLayout, Part, projection_shapes
from offload.registry import lookup

if TYPE_CHECKING:
    from offload.checkpoint.families import Family
    from offload.spec import ModelSpec

Check = Callable[..., TensorInfo]  # checkpoint.tensors.check_tensor: the tensor's info, or an error naming it


class ExpertStorage(Protocol):
    def names(self, family: Family, spec: ModelSpec, fmt: ExpertFormat, layer: int,
              expert: int) -> list[tuple[str, tuple[int, ...], str]]:
        """(tensor name, shape, format suffix) of what holds one expert, in the format's order."""
        ...

    def tensors(self, family: Family, spec: ModelSpec, fmt: ExpertFormat, tensors: dict, check: Check,
                layer: int, expert: int) -> tuple[TensorInfo, ...]: ...

    def source_layout(self, spec: ModelSpec, fmt: ExpertFormat, parts: Sequence[Part]) -> ExpertLayout: ...

    def probe(self, family: Family, spec: ModelSpec) -> str: ...  # a float expert tensor's name, to detect the format

    def expert_numel(self, shape: tuple[int, ...]) -> int: ...  # one expert's elements of a tensor ``names`` lists

    def marker(self, family: Family, spec: ModelSpec) -> str: ...  # what the first expert's tensor names start with

    fused: bool  # one tensor holds a layer's experts (so an expert is a slice, not tensors of its own)

    def accepts(self, fmt: ExpertFormat) -> bool: ...  # whether experts of this format can be stored this way


def _experts(family: Family, layer: int) -> str:
    """The experts' module of a layer ("model.layers.L.mlp.experts."; Gemma-4 has no MoE block module)."""
    return ".".join(p for p in (f"model.layers.{layer}", family.moe_prefix, "experts") if p) + "."


class PerExpert:
    """``<moe_prefix>.experts.N.<projection>.<suffix>``, the suffixes the format names (weight; qweight, ...)."""

    name = "per-expert"
    fused = False

    def names(self, family: Family, spec: ModelSpec, fmt: ExpertFormat, layer: int,
              expert: int) -> list[tuple[str, tuple[int, ...], str]]:
        return [(f"{module}.{suffix}", shape, suffix)
                for module, (out, inn) in zip(family.expert_modules(layer, expert), projection_shapes(spec),
                                              strict=True)
                for suffix, shape in fmt.shapes(out, inn).items()]

    def tensors(self, family: Family, spec: ModelSpec, fmt: ExpertFormat, tensors: dict, check: Check,
                layer: int, expert: int) -> tuple[TensorInfo, ...]:
        return tuple(check(tensors, name, shape, fmt.dtypes(suffix))
                     for name, shape, suffix in self.names(family, spec, fmt, layer, expert))

    def source_layout(self, spec: ModelSpec, fmt: ExpertFormat, parts: Sequence[Part]) -> ExpertLayout:
        n = len(fmt.tensor_suffixes())
        shapes = projection_shapes(spec)
        return ExpertLayout(*(fmt.source_matrix(parts[i * n:(i + 1) * n], *shapes[i]) for i in range(3)))

    def probe(self, family: Family, spec: ModelSpec) -> str:
        return f"{family.expert_modules(spec.moe_layers.index(True), 0)[0]}.weight"

    def expert_numel(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape)

    def marker(self, family: Family, spec: ModelSpec) -> str:
        return f"{family.expert_modules(spec.moe_layers.index(True), 0)[0]}."

    def accepts(self, fmt: ExpertFormat) -> bool:
        return True


def _slice(info: TensorInfo, e: int) -> TensorInfo:
    """Expert e of a fused [E, ...] tensor: its contiguous byte range."""
    stride = info.nbytes // info.shape[0]
    return replace(info, name=f"{info.name}[{e}]", shape=tuple(info.shape[1:]), start=info.start + e * stride,
                   end=info.start + (e + 1) * stride)


class FusedPerLayer:
    """gpt-oss: per layer ``experts.<kind>`` tensors of shape [E, ...] holding every expert (the format names the
    kinds: gate_up_proj and down_proj with biases in float, their _blocks / _scales in MXFP4); expert e is slice e."""

    name = "fused"
    fused = True

    def names(self, family: Family, spec: ModelSpec, fmt: ExpertFormat, layer: int,
              expert: int) -> list[tuple[str, tuple[int, ...], str]]:
        base = _experts(family, layer)
        return [(base + name, shape, name.rsplit("_", 1)[-1]) for name, shape in fmt.fused_tensors(spec).items()]

    def tensors(self, family: Family, spec: ModelSpec, fmt: ExpertFormat, tensors: dict, check: Check,
                layer: int, expert: int) -> tuple[TensorInfo, ...]:
        return tuple(_slice(check(tensors, name, shape, fmt.dtypes(suffix)), expert)
                     for name, shape, suffix in self.names(family, spec, fmt, layer, expert))

    def source_layout(self, spec: ModelSpec, fmt: ExpertFormat, parts: Sequence[Part]) -> ExpertLayout:
        return fmt.fused_layout(parts)

    def probe(self, family: Family, spec: ModelSpec) -> str:
        return f"{_experts(family, spec.moe_layers.index(True))}gate_up_proj"

    def expert_numel(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape[1:])

    def marker(self, family: Family, spec: ModelSpec) -> str:
        return self.probe(family, spec)

    def accepts(self, fmt: ExpertFormat) -> bool:
        return True  # the format says which fused tensors it has, or that it has none (fused_tensors)


class Stacked(FusedPerLayer):
    """GGUF, for every family: per layer ``blk.N.ffn_{gate,up,down}_exps.weight`` [E, out, in] (gpt-oss adds
    ``.bias`` [E, out]), llama.cpp's stacked experts; the format names the tensors (experts/formats/gguf.py)."""

    name = "stacked"

    def names(self, family: Family, spec: ModelSpec, fmt: ExpertFormat, layer: int,
              expert: int) -> list[tuple[str, tuple[int, ...], str]]:
        return [(f"blk.{layer}.{name}", shape, name.rsplit(".", 1)[-1])
                for name, shape in fmt.fused_tensors(spec).items()]

    def probe(self, family: Family, spec: ModelSpec) -> str:
        return f"blk.{spec.moe_layers.index(True)}.ffn_down_exps.weight"


class FusedGateUp(FusedPerLayer):
    """Qwen3.5 / Gemma-4 on the hub: per layer ``experts.gate_up_proj`` [E, 2 x inter, hidden] (expert e's gate
    rows, then its up rows) and ``experts.down_proj`` [E, hidden, inter], in float; expert e is slice e, whose
    gate and up halves are two plain matrices back to back."""

    name = "fused-gate-up"

    def names(self, family: Family, spec: ModelSpec, fmt: ExpertFormat, layer: int,
              expert: int) -> list[tuple[str, tuple[int, ...], str]]:
        if not self.accepts(fmt):
            raise UnsupportedModelError(f"experts fused as gate_up_proj / down_proj are read in float, not {fmt.name}",
                                        "quantized releases store one module per expert, which offload reads")
        e, h, i = spec.num_experts, spec.hidden_size, spec.expert_intermediate_size
        base = _experts(family, layer)
        return [(base + "gate_up_proj", (e, 2 * i, h), "weight"), (base + "down_proj", (e, h, i), "weight")]

    def source_layout(self, spec: ModelSpec, fmt: ExpertFormat, parts: Sequence[Part]) -> ExpertLayout:
        gate_up, down = parts
        gate = Part(gate_up.offset, gate_up.dtype, (spec.expert_intermediate_size, spec.hidden_size))
        return ExpertLayout(DenseMatrix(gate), DenseMatrix(gate.at(gate.end)), DenseMatrix(down))

    def accepts(self, fmt: ExpertFormat) -> bool:
        return fmt.float_dtype is not None


STORAGES: dict[str, ExpertStorage] = {s.name: s for s in (PerExpert(), FusedPerLayer(), FusedGateUp(), Stacked())}


def storage_of(family: Family, spec: ModelSpec, tensors: dict | None = None,
               fmt: ExpertFormat | None = None) -> ExpertStorage:
    """The storage of a checkpoint's experts: the first of the family's whose tensors ``tensors`` has, or (from
    config.json alone) the first that holds ``fmt``; else the family's first, whose missing tensors are named."""
    candidates = [lookup(STORAGES, name, "expert storage") for name in family.expert_storage]
    for storage in candidates:
        if tensors is not None:
            marker = storage.marker(family, spec)
            if any(name.startswith(marker) for name in tensors):
                return storage
        elif fmt is None or storage.accepts(fmt):
            return storage
    return candidates[0]


def first_tensor(storage: ExpertStorage, family: Family, spec: ModelSpec, fmt: ExpertFormat) -> str:
    """The first tensor of the first expert in ``fmt``: its absence means the files are not in that format."""
    return storage.names(family, spec, fmt, spec.moe_layers.index(True), 0)[0][0]


def stored_nbytes(family: Family, spec: ModelSpec, fmt: ExpertFormat) -> int:
    """One expert's bytes in ``fmt`` from config.json alone: each of its tensors' elements (a fused tensor's share
    per expert) times the dtype the format usually stores it in."""
    storage = storage_of(family, spec, fmt=fmt)
    total = 0
    for _, shape, suffix in storage.names(family, spec, fmt, spec.moe_layers.index(True), 0):
        total += storage.expert_numel(shape) * fmt.stored_dtype(suffix, spec.checkpoint_dtype).itemsize
    return total

