"""FP8 e4m3 with 128 x 128 block scales (``quant_method: "fp8"`` with ``weight_block_size``), as DeepSeek-V3/R1,
Kimi-K2 and MiniMax-M2 release every linear projection: ``.weight`` float8_e4m3fn and ``.weight_scale_inv`` float32
per block. Resident projections are dequantized once at load; experts stay FP8 on disk and in the RAM tier and are
dequantized once per miss into a CPU slot (formats/base.py: dequantized_slot), per matmul on a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from offload.errors import UnsupportedModelError
from offload.experts.formats.base import ExpertFormat, dequantized_slot
from offload.experts.layouts import ExpertLayout, Linear, Matrix, Part, pack_matrices, projection_shapes

if TYPE_CHECKING:
    from offload.spec import ModelSpec

_E4M3_LUT = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # byte -> float32 value


def fp8_block_dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP8 e4m3 [out, in] with one float32 scale per (128 x 128) block [ceil(out/128), ceil(in/128)] -> float32.

    The bytes are looked up in a 256-entry table (torch's float8 -> float cast is ~4x slower on CPU) and the
    scales broadcast over the blocks; a shape that is not a multiple of the block repeats them instead."""
    out, inn = w.shape
    values = _E4M3_LUT.to(w.device).index_select(0, w.view(torch.uint8).reshape(-1).to(torch.int32)).view(out, inn)
    scale = scale_inv.float()
    if out % block[0] == 0 and inn % block[1] == 0:
        blocked = values.view(out // block[0], block[0], inn // block[1], block[1])
        return (blocked * scale[:, None, :, None]).view(out, inn)
    return values * scale.repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inn]


@dataclass(frozen=True)
class Fp8Matrix:
    """An FP8 e4m3 projection with block scales (DeepSeek-V3): kept FP8 in every tier, dequantized into the
    activations' dtype per matmul (this CPU has no FP8 matmul)."""

    w: Part
    scale_inv: Part
    block: tuple[int, int]

    @property
    def parts(self) -> tuple[Part, ...]:
        return (self.w, self.scale_inv)

    def signature(self) -> tuple:
        return ("fp8-block", self.w.shape, self.scale_inv.shape, self.scale_inv.dtype, self.block)

    def bind(self, buf: torch.Tensor) -> Linear:
        w, s, block = self.w.view(buf), self.scale_inv.view(buf), self.block
        return lambda x: F.linear(x, fp8_block_dequantize(w, s, block).to(x.dtype))

    def dense(self, buf: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The float32 weight (one rounding, as the per-matmul path), for a dense slot to cast once."""
        return fp8_block_dequantize(self.w.view(buf), self.scale_inv.view(buf), self.block), None

    def convert_from(self, src: Matrix, src_buf: torch.Tensor, buf: torch.Tensor) -> None:
        for have, want in zip(src.parts, self.parts, strict=True):
            want.view(buf).copy_(have.view(src_buf))


@dataclass(frozen=True)
class Fp8BlockFormat(ExpertFormat):
    """``.weight`` float8_e4m3fn and ``.weight_scale_inv`` per block, for experts and every other linear projection."""

    block: tuple[int, int] = (128, 128)
    quant_method: ClassVar[str] = "fp8"

    @classmethod
    def from_config(cls, quantization_config: dict) -> Fp8BlockFormat:
        qc = quantization_config
        block = qc.get("weight_block_size") or [128, 128]
        if qc.get("fmt", "e4m3") not in ("e4m3", "float8_e4m3fn") or len(block) != 2:  # MiniMax-M2: the dtype's name
            raise UnsupportedModelError(f"fp8 {qc.get('fmt')} with blocks {block}",
                                        "offload reads e4m3 FP8 with 2-D weight_block_size")
        return cls((int(block[0]), int(block[1])))

    @property
    def name(self) -> str:
        return f"fp8 e4m3, {self.block[0]}x{self.block[1]} blocks"

    def tensor_suffixes(self) -> tuple[str, ...]:
        return ("weight", "weight_scale_inv")

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        return {"weight": (out_features, in_features),
                "weight_scale_inv": (-(-out_features // self.block[0]), -(-in_features // self.block[1]))}

    def dtypes(self, suffix: str) -> tuple[torch.dtype, ...]:
        return (torch.float8_e4m3fn,) if suffix == "weight" else (torch.float32, torch.bfloat16, torch.float16)

    def source_matrix(self, parts: Sequence[Part], out_features: int, in_features: int) -> Matrix:
        return Fp8Matrix(parts[0], parts[1], self.block)

    def host_layout(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                    activations: str) -> ExpertLayout:
        """FP8 bytes and float32 block scales: what the RAM tier holds (one byte per weight)."""
        return pack_matrices([Fp8Matrix(*(Part(0, self.dtypes(k)[0] if k == "weight" else torch.float32, shape)
                                          for k, shape in self.shapes(out, inn).items()), self.block)
                              for out, inn in projection_shapes(spec)])

    def slot_layout(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                    activations: str) -> ExpertLayout:
        """On CPU, dequantized once into a dense slot of the compute dtype; on a GPU, FP8 (dequantized_slot)."""
        return dequantized_slot(self.host_layout(spec, dtype, device, activations), spec, dtype, device, bias=False)

    def dense_parts(self, tensors: Mapping, name: str, shape: tuple[int, ...]) -> dict | None:
        module = name.removesuffix(".weight")
        info = tensors.get(name)
        if info is None or info.dtype != torch.float8_e4m3fn or len(shape) != 2:
            return None
        return {suffix: (f"{module}.{suffix}", part_shape, self.dtypes(suffix))
                for suffix, part_shape in self.shapes(*shape).items()}

    def dense_weight(self, tensors: Mapping[str, torch.Tensor], name: str, out_features: int,
                     in_features: int) -> torch.Tensor:
        return fp8_block_dequantize(tensors["weight"], tensors["weight_scale_inv"], self.block)
