"""Float experts (float32, bfloat16, float16): one ``.weight`` per projection, computed in the compute dtype;
gpt-oss's float checkpoints fuse a layer's experts into ``gate_up_proj`` / ``down_proj`` tensors instead."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from offload.experts.formats.base import ExpertFormat
from offload.experts.layouts import (
    DenseMatrix,
    ExpertLayout,
    FusedColumns,
    InOutMatrix,
    Matrix,
    Part,
    pack_matrices,
    packed_layout,
    projection_shapes,
)

if TYPE_CHECKING:
    from offload.spec import ModelSpec


@dataclass(frozen=True)
class DenseFormat(ExpertFormat):
    """Float experts, stored in ``dtype``, computed in the compute dtype."""

    dtype: torch.dtype

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def float_dtype(self) -> torch.dtype:
        return self.dtype

    def tensor_suffixes(self) -> tuple[str, ...]:
        return ("weight",)

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        return {"weight": (out_features, in_features)}

    def dtypes(self, suffix: str) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16, torch.float64)

    def stored_dtype(self, suffix: str, checkpoint_dtype: torch.dtype) -> torch.dtype:
        return self.dtype

    def source_matrix(self, parts: Sequence[Part], out_features: int, in_features: int) -> Matrix:
        return DenseMatrix(parts[0])

    def fused_tensors(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """gpt-oss as transformers saves it: gate_up [E, H, 2I] (gate and up interleaved in its columns, in-out
        orientation) and down [E, I, H], each with a bias."""
        e, h, i = spec.num_experts, spec.hidden_size, spec.expert_intermediate_size
        return {"gate_up_proj": (e, h, 2 * i), "gate_up_proj_bias": (e, 2 * i), "down_proj": (e, i, h),
                "down_proj_bias": (e, h)}

    def fused_layout(self, parts: Sequence[Part]) -> ExpertLayout:
        gate_up, gate_up_bias, down, down_bias = parts
        return ExpertLayout(FusedColumns(gate_up, gate_up_bias, 0), FusedColumns(gate_up, gate_up_bias, 1),
                            InOutMatrix(down, down_bias))

    def slot_layout(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                    activations: str) -> ExpertLayout:
        """The compute dtype's packing (float experts compute in the model's dtype, whatever ``activations``)."""
        if not spec.expert_bias:
            return packed_layout(spec.hidden_size, spec.expert_intermediate_size, dtype)
        return pack_matrices([DenseMatrix(Part(0, dtype, (out, inn)), Part(0, dtype, (out,)))
                              for out, inn in projection_shapes(spec)])
