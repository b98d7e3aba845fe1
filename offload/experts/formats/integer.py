"""Integer weight-only formats (GPTQ, compressed-tensors pack-quantized): what they share once read.

Both store int4 / int8 codes with per-group scales (and zero points) and unpack to one QuantizedWeight; what a
cache slot holds is the same for both: on the CPU, the codes exactly as packed (plain nibbles for int4) beside
float32 scales and mins, which offload's kernels compute from (kernels/rows.py), else a portable layout that
dequantizes per matmul. A miss copies the codes (int8: a sign flip) and converts only the per-group scales and
zero points; a disk miss of compressed-tensors int4 reads the codes straight into the slot, where the kernels use
them (KernelMatrix.over), and derives only the scales beside them. The RAM tier holds experts already converted,
so its misses are one memcpy. Nothing in the layout depends on the CPU.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from offload.experts import quant
from offload.experts.formats.base import ExpertFormat
from offload.experts.kernels.linear import IntLinear, int_kernel_runs
from offload.experts.layouts import ExpertLayout, Linear, Matrix, Part, pack_matrices, projection_shapes
from offload.experts.quant import QuantizedWeight, QuantScheme

if TYPE_CHECKING:
    from offload.spec import ModelSpec


class IntegerMatrix(Matrix, Protocol):
    """A projection as an integer checkpoint stores it: what the slot layouts convert from."""

    def unpack(self, buf: torch.Tensor) -> QuantizedWeight: ...

    def plain(self, buf: torch.Tensor) -> torch.Tensor: ...  # codes in plain packing [out, in * bits / 8]

    def scales_zeros(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...  # float32 [out, groups]

    def packed_group_size(self, in_features: int) -> int: ...


class StoredMatrix:
    """What the integer checkpoint matrices share: they are converted into a slot layout, never computed from or
    written into as they are."""

    group_size: int | None

    def packed_group_size(self, in_features: int) -> int:
        return self.group_size or in_features

    def bind(self, buf: torch.Tensor) -> Linear:
        raise TypeError(f"{type(self).__name__} bytes are converted into a slot layout before use")

    def convert_from(self, src: Matrix, src_buf: torch.Tensor, buf: torch.Tensor) -> None:
        raise TypeError("a checkpoint format is read, never written into")


# -- matrices as a slot holds them ----------------------------------------------------------------------


def _copy(dst: Part, buf: torch.Tensor, value: torch.Tensor) -> None:
    dst.view(buf).copy_(value.reshape(dst.shape))


def _align64(offset: int) -> int:
    return -(-offset // 64) * 64


@dataclass(frozen=True)
class KernelMatrix:
    """What the CPU kernels compute from (kernels/linear.py IntLinear): the codes as the checkpoint packs them
    (int4 plain nibbles [N, K/2], or int8 [N, K] as signed bytes, code - 128), float32 scales [N, groups] and
    mins = scale * zero point [N, groups] (zero point in the codes' own range), W = scales * q - mins.

    The layout does not depend on the CPU, so a miss copies the codes (no shuffle); only the small per-group
    scales and zero points are converted from the checkpoint's dtypes and packings.
    """

    codes: Part
    scales: Part
    mins: Part
    activations: str  # "int8" or "int16": how the kernel quantizes activations (--quant-activations)

    @property
    def parts(self) -> tuple[Part, ...]:
        return (self.codes, self.scales, self.mins)

    def signature(self) -> tuple:
        return ("kernel-int", self.codes.dtype, self.codes.shape, self.scales.shape, self.activations)

    def bind(self, buf: torch.Tensor) -> Linear:
        return IntLinear(self.codes.view(buf), self.scales.view(buf), self.mins.view(buf), self.activations)

    def over(self, src: Matrix, tail: int) -> KernelMatrix | None:
        """This matrix computing from ``src``'s codes where they lie, when the checkpoint stores them as the kernel
        reads them (compressed-tensors' int4 words are plain nibbles); scales and mins go from ``tail`` on."""
        codes = getattr(src, "plain_part", None)
        if codes is None or codes.dtype != self.codes.dtype or codes.shape != self.codes.shape:
            return None  # int8's codes flip sign; GPTQ packs along the inputs
        scales = self.scales.at(_align64(tail))
        return replace(self, codes=codes, scales=scales, mins=self.mins.at(_align64(scales.end)))

    def convert_from(self, src: Matrix, src_buf: torch.Tensor, buf: torch.Tensor) -> None:
        if isinstance(src, KernelMatrix):
            for have, want in zip(src.parts, self.parts, strict=True):
                want.view(buf).copy_(have.view(src_buf))
            return
        scales, zeros = src.scales_zeros(src_buf)  # type: ignore[attr-defined]  # float32 [N, groups] each
        groups = self.scales.shape[1]
        if scales.shape[1] != groups:  # a checkpoint group that is a multiple of the slot's: repeat its pairs
            scales = scales.repeat_interleave(groups // scales.shape[1], dim=1)
            zeros = zeros.repeat_interleave(groups // zeros.shape[1], dim=1)
        plain = src.plain(src_buf)  # type: ignore[attr-defined]  # uint8 [N, K * bits / 8]
        codes = self.codes.view(buf)
        if codes.dtype == torch.int8:  # int8: signed codes, so the zero point moves by 128 too
            np.bitwise_xor(plain.contiguous().numpy(), np.uint8(0x80), out=codes.view(torch.uint8).numpy())
            zeros = zeros - 128
        elif codes.data_ptr() != plain.data_ptr():  # laid over the read codes (``over``): nothing to copy
            codes.copy_(plain)
        _copy(self.scales, buf, scales)
        torch.mul(scales, zeros, out=self.mins.view(buf))


@dataclass(frozen=True)
class DequantMatrix:
    """The portable layout (any device, any shape): codes in plain packing, float32 scales and zeros, and a
    matmul that dequantizes into the activation dtype first (CUDA, shapes the kernels do not take, and the
    exact ``--quant-activations float32``)."""

    codes: Part   # uint8 [N, K * bits / 8]
    scales: Part  # float32 [N, groups]
    zeros: Part   # float32 [N, groups]
    bits: int
    group_size: int | None
    dtype: torch.dtype  # the matmul's dtype (float32 when exactness is asked for)

    @property
    def parts(self) -> tuple[Part, ...]:
        return (self.codes, self.scales, self.zeros)

    def signature(self) -> tuple:
        return ("dequant", self.bits, self.group_size, self.dtype, self.codes.shape, self.scales.shape)

    def bind(self, buf: torch.Tensor) -> Linear:
        codes, scales, zeros = self.codes.view(buf), self.scales.view(buf), self.zeros.view(buf)
        scheme = QuantScheme(self.bits, self.group_size, False)
        dtype = self.dtype

        def linear(x: torch.Tensor) -> torch.Tensor:
            q = QuantizedWeight(quant.unpack_nibbles(codes) if scheme.bits == 4 else codes, scales, zeros, scheme)
            return F.linear(x.to(dtype), quant.dequantize(q, dtype)).to(x.dtype)

        return linear

    def convert_from(self, src: Matrix, src_buf: torch.Tensor, buf: torch.Tensor) -> None:
        q = src.unpack(src_buf)  # type: ignore[attr-defined]
        _copy(self.codes, buf, quant.pack_nibbles(q.codes) if self.bits == 4 else q.codes)
        _copy(self.scales, buf, q.scales)
        _copy(self.zeros, buf, q.zeros)


# -- the formats' common part ------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntegerFormat(ExpertFormat):
    """Experts quantized to int4 / int8 in a released checkpoint format (a subclass per format)."""

    scheme: QuantScheme
    checks_values: ClassVar[bool] = True  # GPTQ's g_idx (act-order) and zero points are only seen by unpacking

    @classmethod
    def from_config(cls, quantization_config: dict) -> IntegerFormat:
        return cls(cls.read_scheme(quantization_config))

    @staticmethod
    @abstractmethod
    def read_scheme(quantization_config: dict) -> QuantScheme:
        """The scheme a quantization_config names; raises on what the format's unpacker cannot read."""

    @property
    def name(self) -> str:
        return f"{self.scheme} ({self.quant_method})"

    @abstractmethod
    def unpack(self, tensors: Mapping[str, torch.Tensor], name: str, out_features: int,
               in_features: int) -> QuantizedWeight:
        """One projection's tensors (by suffix) -> QuantizedWeight; errors name ``name``."""

    def check_expert(self, tensors: Mapping[str, torch.Tensor], name: str, out_features: int,
                     in_features: int) -> None:
        self.unpack(tensors, name, out_features, in_features)

    def slot_matrix(self, out_features: int, in_features: int, device: torch.device, dtype: torch.dtype,
                    activations: str) -> Matrix:
        """The kernels' layout on the CPU when they take the matrix (int8 / int16 activations, groups of 32n inputs);
        else the portable dequantizing one, in float32 for ``--quant-activations float32`` (exact) or ``dtype``."""
        s = self.scheme
        group = s.group_size or in_features
        groups = s.groups(in_features)
        if device.type == "cpu" and activations in ("int8", "int16") and int_kernel_runs(in_features, group):
            codes = (Part(0, torch.uint8, (out_features, in_features // 2)) if s.bits == 4
                     else Part(0, torch.int8, (out_features, in_features)))
            per_group = Part(0, torch.float32, (out_features, groups))
            return KernelMatrix(codes, per_group, per_group, activations)
        per_group = Part(0, torch.float32, (out_features, groups))
        return DequantMatrix(Part(0, torch.uint8, (out_features, in_features * s.bits // 8)), per_group, per_group,
                             s.bits, s.group_size, torch.float32 if activations == "float32" else dtype)

    def slot_layout(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                    activations: str) -> ExpertLayout:
        """Gate, up and down in their fastest layouts, back to back."""
        return pack_matrices([self.slot_matrix(out, inn, device, dtype, activations)
                              for out, inn in projection_shapes(spec)])

    def dense_parts(self, tensors: Mapping, name: str, shape: tuple[int, ...]) -> dict | None:
        """A resident projection stored in this format (GPTQ quantizes attention: ``X.qweight`` ... instead of
        ``X.weight``); None when it is stored as a float."""
        module = name.removesuffix(".weight")
        if name in tensors or len(shape) != 2 or f"{module}.{self.tensor_suffixes()[0]}" not in tensors:
            return None
        return {suffix: (f"{module}.{suffix}", part_shape, self.dtypes(suffix))
                for suffix, part_shape in self.shapes(*shape).items()}

    def dense_weight(self, tensors: Mapping[str, torch.Tensor], name: str, out_features: int,
                     in_features: int) -> torch.Tensor:
        return quant.dequantize(self.unpack(tensors, name, out_features, in_features))

    def compute_key(self, dtype: torch.dtype, activations: str, device: str) -> str:
        """The CPU kernels' rate for its bits (as its slot layout picks them), else the dequantizing layout's, about
        the activation dtype's; on CUDA the measured dequantizing rate of its bits."""
        if device == "cuda" or activations in ("int8", "int16"):
            return f"int{self.scheme.bits}"
        return "float32"

    def host_compute_key(self, dtype: torch.dtype, activations: str, device: str) -> str:
        """On CUDA the RAM tier holds the portable dequantizing layout, which the CPU runs at about the compute
        dtype's rate, not at the integer kernels'."""
        if device == "cuda":
            return "float32" if activations == "float32" else str(dtype).removeprefix("torch.")
        return self.compute_key(dtype, activations, "cpu")
