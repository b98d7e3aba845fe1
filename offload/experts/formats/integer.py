"""Integer weight-only formats (GPTQ, compressed-tensors pack-quantized): what they share once read.

Both store int4 / int8 codes with per-group scales (and zero points) and unpack to one QuantizedWeight; what a
cache slot holds is the same for both: torch's CPU int4 / int8 kernel layouts where a kernel runs the matrix
(kernels/torch_cpu.py), else a portable layout that dequantizes per matmul. A miss converts the checkpoint's bytes
into the slot: for int4 a nibble shuffle into the CPU kernel's layout (~0.4 ms for a 3584x1024 matrix), for int8
a sign flip. The RAM tier holds experts already converted, so its misses are one memcpy. Kernel layouts depend on
the CPU torch dispatches to, so they are built in the process that uses them and never written to disk.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
import torch.nn.functional as F

from offload.experts import quant
from offload.experts.formats.base import ExpertFormat
from offload.experts.kernels import torch_cpu
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


@dataclass(frozen=True)
class Int4Matrix:
    """torch's CPU int4 layout: packed uint8 [N, K/2] and tinygemm's bf16 (scale, zero) [K/G, N, 2]."""

    packed: Part
    scales_and_zeros: Part
    group: int  # the kernel's group G (a checkpoint group that is a multiple of G repeats its scales)

    @property
    def parts(self) -> tuple[Part, ...]:
        return (self.packed, self.scales_and_zeros)

    def signature(self) -> tuple:
        return ("cpu-int4", self.group, self.packed.shape, self.scales_and_zeros.shape)

    def bind(self, buf: torch.Tensor) -> Linear:
        packed, sz, group = self.packed.view(buf), self.scales_and_zeros.view(buf), self.group
        return lambda x: torch_cpu.int4_linear(x, packed, group, sz)

    def convert_from(self, src: Matrix, src_buf: torch.Tensor, buf: torch.Tensor) -> None:
        if isinstance(src, Int4Matrix):
            for have, want in zip(src.parts, self.parts, strict=True):
                want.view(buf).copy_(have.view(src_buf))
            return
        scales, zeros = src.scales_zeros(src_buf)  # type: ignore[attr-defined]
        group_size = src.packed_group_size(self.packed.shape[1] * 2)  # type: ignore[attr-defined]
        # Both straight into the slot: no temporaries to fault in and copy (this runs on every disk-tier miss).
        torch_cpu.plain_to_cpu_int4(src.plain(src_buf).contiguous(), out=self.packed.view(buf))  # type: ignore[attr-defined]
        torch_cpu.int4_scales_and_zeros(scales, zeros, group_size, self.group, out=self.scales_and_zeros.view(buf))


@dataclass(frozen=True)
class Int8Matrix:
    """torch's CPU int8 kernel layout: w int8 [N, K] (codes - 128) and one bf16 scale per row."""

    w: Part
    scales: Part

    @property
    def parts(self) -> tuple[Part, ...]:
        return (self.w, self.scales)

    def signature(self) -> tuple:
        return ("cpu-int8", self.w.shape)

    def bind(self, buf: torch.Tensor) -> Linear:
        w, scales = self.w.view(buf), self.scales.view(buf)
        return lambda x: torch_cpu.int8_linear(x, w, scales)

    def convert_from(self, src: Matrix, src_buf: torch.Tensor, buf: torch.Tensor) -> None:
        _, scales = torch_cpu.int8_kernel_pack(src.unpack(src_buf), out=self.w.view(buf))  # type: ignore[attr-defined]
        _copy(self.scales, buf, scales)


@dataclass(frozen=True)
class DequantMatrix:
    """The portable layout (any device, any shape): codes in plain packing, float32 scales and zeros, and a
    matmul that dequantizes into the activation dtype first (torch has no CPU kernel for these shapes)."""

    codes: Part   # uint8 [N, K * bits / 8]
    scales: Part  # float32 [N, groups]
    zeros: Part   # float32 [N, groups]
    bits: int
    group_size: int | None
    dtype: torch.dtype  # the activations' dtype for the matmul (float32 when exactness is asked for)

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

    def slot_matrix(self, out_features: int, in_features: int, device: torch.device,
                    activations: torch.dtype) -> Matrix:
        """The fastest layout that computes this matrix here: a CPU kernel's, else the portable one."""
        s, kernel = self.scheme, torch_cpu.kernel_for(out_features, in_features, self.scheme)
        if device.type == "cpu" and activations == torch.bfloat16 and kernel == "int4":
            group = torch_cpu.int4_kernel_group(out_features, in_features, s.group_size)
            return Int4Matrix(Part(0, torch.uint8, (out_features, in_features // 2)),
                              Part(0, torch.bfloat16, (in_features // group, out_features, 2)), group)
        if device.type == "cpu" and activations == torch.bfloat16 and kernel == "int8":
            return Int8Matrix(Part(0, torch.int8, (out_features, in_features)),
                              Part(0, torch.bfloat16, (out_features,)))
        groups = s.groups(in_features)
        per_group = Part(0, torch.float32, (out_features, groups))
        return DequantMatrix(Part(0, torch.uint8, (out_features, in_features * s.bits // 8)), per_group, per_group,
                             s.bits, s.group_size, activations)

    def slot_layout(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                    activations: torch.dtype) -> ExpertLayout:
        """Gate, up and down in their fastest layouts, back to back (``dtype``, the model's, is not used:
        quantized matrices compute with ``activations``)."""
        return pack_matrices([self.slot_matrix(out, inn, device, activations) for out, inn in projection_shapes(spec)])

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

    def compute_key(self, dtype: torch.dtype, activations: torch.dtype, device: str) -> str:
        """Its kernel's rate on the CPU with bf16 activations (as its slot layout picks), else the dequantizing
        layout's, about the activation dtype's; on CUDA the measured dequantizing rate of its bits."""
        if device == "cuda" or activations == torch.bfloat16:
            return f"int{self.scheme.bits}"
        return str(activations).removeprefix("torch.")

    def host_compute_key(self, dtype: torch.dtype, activations: torch.dtype, device: str) -> str:
        """On CUDA the RAM tier holds the portable dequantizing layout, which the CPU runs at about its activation
        dtype's rate, not at the int4/int8 kernels'."""
        if device == "cuda":
            return str(activations).removeprefix("torch.")
        return self.compute_key(dtype, activations, "cpu")
