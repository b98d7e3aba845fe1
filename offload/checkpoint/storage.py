"""How a family's checkpoint lays its experts out in tensors: one module per expert (Mixtral, Qwen,
DeepSeek, GLM: ``experts.N.gate_proj.*``), or one fused tensor per layer and kind holding every expert
(gpt-oss: ``experts.gate_up_proj`` [E, hidden, 2 x inter], or its MXFP4 ``_blocks`` / ``_scales``).

Either way an expert is a list of byte ranges in the files, so the disk tier reads it with one read
per run of adjacent ranges (a fused tensor's slice e is contiguous), and a layout of matrices in the
checkpoint's format, which the slot layout converts from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from offload.experts.formats.quantized import Mxfp4Format, Mxfp4Matrix
from offload.experts.layouts import ExpertFormat, ExpertLayout, FusedColumns, InOutMatrix, Part
from offload.registry import lookup

if TYPE_CHECKING:
    from offload.checkpoint.families import Family
    from offload.checkpoint.plan import TensorInfo
    from offload.spec import ModelSpec

def projection_shapes(spec: ModelSpec) -> tuple[tuple[int, int], ...]:
    """(out, in) of gate, up and down."""
    h, i = spec.hidden_size, spec.expert_intermediate_size
    return ((i, h), (i, h), (h, i))


class ExpertStorage(Protocol):
    def tensors(self, family: Family, spec: ModelSpec, fmt: ExpertFormat, tensors: dict, check,
                layer: int, expert: int) -> tuple[TensorInfo, ...]: ...

    def source_layout(self, spec: ModelSpec, fmt: ExpertFormat, parts: Sequence[Part]) -> ExpertLayout: ...

    def probe(self, family: Family, spec: ModelSpec) -> str: ...  # a float expert tensor's name, to detect the format


class PerExpert:
    """``<moe_prefix>.experts.N.<projection>.<suffix>``, the suffixes the format names (weight; qweight, ...)."""

    name = "per-expert"

    def tensors(self, family: Family, spec: ModelSpec, fmt: ExpertFormat, tensors: dict, check,
                layer: int, expert: int) -> tuple[TensorInfo, ...]:
        return tuple(check(tensors, f"{module}.{suffix}", shape, fmt.dtypes(suffix))
                     for module, (out, inn) in zip(family.expert_modules(layer, expert), projection_shapes(spec),
                                                   strict=True)
                     for suffix, shape in fmt.shapes(out, inn).items())

    def source_layout(self, spec: ModelSpec, fmt: ExpertFormat, parts: Sequence[Part]) -> ExpertLayout:
        n = len(fmt.tensor_suffixes())
        shapes = projection_shapes(spec)
        return ExpertLayout(*(fmt.source_matrix(parts[i * n:(i + 1) * n], *shapes[i]) for i in range(3)))

    def probe(self, family: Family, spec: ModelSpec) -> str:
        return f"{family.expert_modules(spec.moe_layers.index(True), 0)[0]}.weight"


def _slice(info: TensorInfo, e: int) -> TensorInfo:
    """Expert e of a fused [E, ...] tensor: its contiguous byte range."""
    stride = info.nbytes // info.shape[0]
    return replace(info, name=f"{info.name}[{e}]", shape=tuple(info.shape[1:]), start=info.start + e * stride,
                   end=info.start + (e + 1) * stride)


class FusedPerLayer:
    """gpt-oss: per layer ``experts.gate_up_proj`` [E, H, 2I] (+ ``_bias`` [E, 2I]) with gate and up interleaved,
    ``experts.down_proj`` [E, I, H] (+ bias), in (in, out) orientation as transformers saves them; or, as
    released, MXFP4 ``*_blocks`` [E, out, in/32, 16] and ``*_scales`` [E, out, in/32] in (out, in)."""

    name = "fused"

    def _shapes(self, spec: ModelSpec, fmt: ExpertFormat) -> dict[str, tuple[int, ...]]:
        e, h, i = spec.num_experts, spec.hidden_size, spec.expert_intermediate_size
        if isinstance(fmt, Mxfp4Format):
            return {"gate_up_proj_blocks": (e, 2 * i, h // 32, 16), "gate_up_proj_scales": (e, 2 * i, h // 32),
                    "gate_up_proj_bias": (e, 2 * i), "down_proj_blocks": (e, h, i // 32, 16),
                    "down_proj_scales": (e, h, i // 32), "down_proj_bias": (e, h)}
        return {"gate_up_proj": (e, h, 2 * i), "gate_up_proj_bias": (e, 2 * i), "down_proj": (e, i, h),
                "down_proj_bias": (e, h)}

    def tensors(self, family: Family, spec: ModelSpec, fmt: ExpertFormat, tensors: dict, check,
                layer: int, expert: int) -> tuple[TensorInfo, ...]:
        base = f"model.layers.{layer}.{family.moe_prefix}.experts."
        kinds = self._shapes(spec, fmt).items()
        return tuple(_slice(check(tensors, base + name, shape, fmt.dtypes(name.rsplit("_", 1)[-1])), expert)
                     for name, shape in kinds)

    def source_layout(self, spec: ModelSpec, fmt: ExpertFormat, parts: Sequence[Part]) -> ExpertLayout:
        if isinstance(fmt, Mxfp4Format):
            gu_blocks, gu_scales, gu_bias, d_blocks, d_scales, d_bias = parts
            return ExpertLayout(Mxfp4Matrix(gu_blocks, gu_scales, gu_bias, 0),
                                Mxfp4Matrix(gu_blocks, gu_scales, gu_bias, 1), Mxfp4Matrix(d_blocks, d_scales, d_bias))
        gate_up, gate_up_bias, down, down_bias = parts
        return ExpertLayout(FusedColumns(gate_up, gate_up_bias, 0), FusedColumns(gate_up, gate_up_bias, 1),
                            InOutMatrix(down, down_bias))

    def probe(self, family: Family, spec: ModelSpec) -> str:
        return f"model.layers.{spec.moe_layers.index(True)}.{family.moe_prefix}.experts.gate_up_proj"


STORAGES: dict[str, ExpertStorage] = {s.name: s for s in (PerExpert(), FusedPerLayer())}


def storage_of(family: Family) -> ExpertStorage:
    return lookup(STORAGES, family.expert_storage, "expert storage")

