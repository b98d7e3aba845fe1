"""MXFP4 (OCP microscaling FP4), as gpt-oss releases its experts (``quant_method: "mxfp4"``).

blocks uint8 [..., out, in/32, 16] hold two FP4 E2M1 codes per byte (low nibble first; values 0, 0.5, 1, 1.5, 2,
3, 4, 6 and their negatives) and scales uint8 [..., out, in/32] are E8M0 with bias 127 (scale = 2^(s-127)); a layer's
experts share fused tensors, gate and up interleaved in gate_up's rows. 4.25 bits per weight on disk, in the RAM
tier and, on the CPU with int8 activations (the default), in a cache slot: the kernel (kernels/linear.py Mxfp4Linear)
computes from the codes and exponents as stored. With ``--quant-activations int16/float32`` a CPU miss dequantizes
the expert once into a dense slot (formats/base.py: dequantized_slot), exact; on a GPU the slot stays MXFP4 and
dequantizes per matmul.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from offload.errors import UnsupportedModelError
from offload.experts.formats.base import FLOATS, ExpertFormat, dequantized_slot
from offload.experts.kernels.linear import Mxfp4Linear
from offload.experts.layouts import ExpertLayout, Linear, Matrix, Part, pack_matrices, projection_shapes

if TYPE_CHECKING:
    from offload.spec import ModelSpec

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # E2M1 codes


@functools.cache
def _fp4_pair_lut(dtype: torch.dtype) -> torch.Tensor:
    """[256] table: byte -> its two E2M1 values in ``dtype``, low nibble first, as one integer of twice the
    width, so a gather of bytes writes both weights at once (a 2-byte dtype pairs into int32, 4 into int64)."""
    width = torch.empty((), dtype=dtype).element_size()
    as_int = {2: torch.int16, 4: torch.int32}[width]
    bits = torch.tensor(FP4_VALUES, dtype=dtype).view(as_int).to(torch.int64) & ((1 << (8 * width)) - 1)
    b = torch.arange(256)
    pair = bits[b & 15] | (bits[b >> 4] << (8 * width))
    return pair.to({2: torch.int32, 4: torch.int64}[width])


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 (OCP microscaling): blocks uint8 [out, in/32, 16] holding two E2M1 codes per byte (low nibble
    first), scales uint8 [out, in/32] (E8M0: 2^(s - 127)) -> [out, in] in ``dtype``.

    One gather of a byte -> value-pair table and one multiply by the power-of-two scale (exact): ~15x
    faster on CPU than indexing each nibble and ldexp over the whole matrix."""
    out, groups, half = blocks.shape
    wide = torch.float32 if dtype == torch.float16 else dtype  # float16's range misses most 2^(s - 127)
    lut = _fp4_pair_lut(wide).to(blocks.device)
    w = lut.index_select(0, blocks.reshape(-1).to(torch.int32)).view(wide).view(out, groups, 2 * half)
    scale = torch.ldexp(torch.ones(scales.shape, dtype=torch.float32, device=blocks.device),
                        scales.to(torch.int32) - 127)
    return (w * scale.to(wide)[..., None]).view(out, groups * 2 * half).to(dtype)


@dataclass(frozen=True)
class Mxfp4Matrix:
    """An MXFP4 projection: blocks [out, in/32, 16], scales [out, in/32] and a bias [out]. As read from
    gpt-oss's fused tensors, ``rows`` picks gate (0) or up (1) out of the interleaved gate_up rows; in a
    slot (rows None) the matrix is de-interleaved and dequantized into the activations' dtype per matmul."""

    blocks: Part
    scales: Part
    b: Part
    rows: int | None = None
    activations: str = "float32"  # --quant-activations: "int8" computes a de-interleaved CPU copy with the kernel

    @property
    def parts(self) -> tuple[Part, ...]:
        return (self.blocks, self.scales, self.b)

    def signature(self) -> tuple:
        return ("mxfp4", self.blocks.shape, self.rows)

    def _views(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pick = slice(None) if self.rows is None else slice(self.rows, None, 2)
        return self.blocks.view(buf)[pick], self.scales.view(buf)[pick], self.b.view(buf)[pick]

    def bind(self, buf: torch.Tensor) -> Linear:
        blocks, scales, bias = self._views(buf)
        if self.activations == "int8" and self.rows is None and buf.device.type == "cpu":
            kernel = Mxfp4Linear(blocks.reshape(blocks.shape[0], -1), scales)
            return lambda x: kernel(x) + bias.to(x.dtype)
        return lambda x: F.linear(x, mxfp4_dequantize(blocks, scales, x.dtype), bias.to(x.dtype))

    def dense(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias in float32 (every MXFP4 value is exact there), for a dense slot to cast once."""
        blocks, scales, bias = self._views(buf)
        return mxfp4_dequantize(blocks, scales, torch.float32), bias

    def convert_from(self, src: Matrix, src_buf: torch.Tensor, buf: torch.Tensor) -> None:
        if not isinstance(src, Mxfp4Matrix):
            raise TypeError(f"an MXFP4 slot cannot hold {type(src).__name__} bytes")
        for have, want in zip(src._views(src_buf), self.parts, strict=True):
            want.view(buf).copy_(have)



@dataclass(frozen=True)
class Mxfp4Format(ExpertFormat):
    """gpt-oss's released experts: 4.25 bits per weight in every tier."""

    quant_method: ClassVar[str] = "mxfp4"

    @classmethod
    def from_config(cls, quantization_config: dict) -> Mxfp4Format:
        return cls()

    @property
    def name(self) -> str:
        return "mxfp4"

    def tensor_suffixes(self) -> tuple[str, ...]:
        return ("blocks", "scales", "bias")

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        return {"blocks": (out_features, in_features // 32, 16), "scales": (out_features, in_features // 32),
                "bias": (out_features,)}

    def dtypes(self, suffix: str) -> tuple[torch.dtype, ...]:
        return (torch.uint8,) if suffix in ("blocks", "scales") else FLOATS

    def stored_dtype(self, suffix: str, checkpoint_dtype: torch.dtype) -> torch.dtype:
        return torch.uint8 if suffix in ("blocks", "scales") else checkpoint_dtype

    def source_matrix(self, parts: Sequence[Part], out_features: int, in_features: int) -> Matrix:
        raise UnsupportedModelError("MXFP4 experts stored one module per expert are not supported",
                                    "offload reads MXFP4 experts fused per layer, as gpt-oss releases them")

    def fused_tensors(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        e, h, i = spec.num_experts, spec.hidden_size, spec.expert_intermediate_size
        return {"gate_up_proj_blocks": (e, 2 * i, h // 32, 16), "gate_up_proj_scales": (e, 2 * i, h // 32),
                "gate_up_proj_bias": (e, 2 * i), "down_proj_blocks": (e, h, i // 32, 16),
                "down_proj_scales": (e, h, i // 32), "down_proj_bias": (e, h)}

    def fused_layout(self, parts: Sequence[Part]) -> ExpertLayout:
        gu_blocks, gu_scales, gu_bias, d_blocks, d_scales, d_bias = parts
        return ExpertLayout(Mxfp4Matrix(gu_blocks, gu_scales, gu_bias, 0),
                            Mxfp4Matrix(gu_blocks, gu_scales, gu_bias, 1), Mxfp4Matrix(d_blocks, d_scales, d_bias))

    def host_layout(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                    activations: str) -> ExpertLayout:
        """Gate, up and down de-interleaved, still MXFP4: what the RAM tier holds (4.25 bits per weight)."""
        return pack_matrices([Mxfp4Matrix(Part(0, torch.uint8, (out, inn // 32, 16)),
                                          Part(0, torch.uint8, (out, inn // 32)), Part(0, dtype, (out,)),
                                          activations=activations)
                              for out, inn in projection_shapes(spec)])

    def slot_layout(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                    activations: str) -> ExpertLayout:
        """On the CPU with int8 activations, the host layout (the kernel computes from it); with int16 / float32
        activations on the CPU, dequantized once into a dense slot of the compute dtype; on a GPU, MXFP4."""
        native = self.host_layout(spec, dtype, device, activations)
        if device.type == "cpu" and activations == "int8":
            return native
        return dequantized_slot(native, spec, dtype, device, bias=True)
