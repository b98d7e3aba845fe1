"""Quantized experts: the checkpoint formats as read (GPTQ v1, compressed-tensors pack-quantized) and the
formats a cache slot holds them in (torch's CPU int4 / int8 kernel layouts, or a portable packed layout
that is dequantized per matmul), as matrices of offload/experts.py.

A miss reads the checkpoint's bytes and converts them into the slot: for int4 a nibble shuffle into
the CPU kernel's layout (~0.4 ms for a 3584x1024 matrix, offload/quant.py), for int8 a sign flip. The
RAM tier holds experts already converted, so its misses are one memcpy. Kernel layouts depend on the
CPU torch dispatches to, so they are built in the process that uses them and never written to disk.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from offload.experts import quant
from offload.experts.layouts import DenseMatrix, ExpertLayout, Linear, Matrix, Part, pack_matrices
from offload.experts.quant import QuantizedWeight, QuantScheme
from offload.spec import ModelSpec

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_INTS = (torch.int32, torch.int64)


# -- matrices as checkpoints store them -----------------------------------------------------------------


@dataclass(frozen=True)
class GptqMatrix:
    """A GPTQ v1 linear layer's tensors: qweight [in*b/32, out], qzeros, scales [groups, out], g_idx [in]."""

    qweight: Part
    qzeros: Part
    scales: Part
    g_idx: Part
    out_features: int
    in_features: int
    bits: int
    group_size: int | None

    @property
    def parts(self) -> tuple[Part, ...]:
        return (self.qweight, self.qzeros, self.scales, self.g_idx)

    def signature(self) -> tuple:
        return ("gptq", self.bits, self.group_size, *((p.dtype, p.shape) for p in self.parts))

    def unpack(self, buf: torch.Tensor) -> QuantizedWeight:
        # g_idx is checked (act-order refused) when the checkpoint is planned, not on every load
        return quant.gptq_unpack(self.qweight.view(buf), self.qzeros.view(buf), self.scales.view(buf), None,
                                 self.bits, self.group_size or -1, shape=(self.out_features, self.in_features))

    def plain(self, buf: torch.Tensor) -> torch.Tensor:
        """The codes in plain packing [out, in*bits/8]: a word transpose."""
        return quant.gptq_plain(self.qweight.view(buf), self.bits)

    def scales_zeros(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quant.gptq_scales_zeros(self.qzeros.view(buf), self.scales.view(buf), self.bits, self.out_features)

    def packed_group_size(self, in_features: int) -> int:
        return self.group_size or in_features

    def bind(self, buf: torch.Tensor) -> Linear:
        raise TypeError("GPTQ bytes are converted into a slot layout before use")

    def convert_from(self, src: Matrix, src_buf: torch.Tensor, buf: torch.Tensor) -> None:
        raise TypeError("a checkpoint format is read, never written into")


@dataclass(frozen=True)
class PackedMatrix:
    """compressed-tensors pack-quantized: weight_packed [out, in*b/32] (the plain packing), weight_scale
    [out, groups], weight_shape [2] and, when asymmetric, weight_zero_point [out*b/32, groups]."""

    weight_packed: Part
    weight_scale: Part
    weight_shape: Part
    weight_zero_point: Part | None
    bits: int
    group_size: int | None
    symmetric: bool

    @property
    def parts(self) -> tuple[Part, ...]:
        return tuple(p for p in (self.weight_packed, self.weight_scale, self.weight_shape, self.weight_zero_point)
                     if p is not None)

    def signature(self) -> tuple:
        return ("pack-quantized", self.bits, self.group_size, self.symmetric, *((p.dtype, p.shape) for p in self.parts))

    def unpack(self, buf: torch.Tensor) -> QuantizedWeight:
        zp = self.weight_zero_point.view(buf) if self.weight_zero_point is not None else None
        return quant.compressed_tensors_unpack(self.weight_packed.view(buf), self.weight_scale.view(buf),
                                               self.weight_shape.view(buf), zp, bits=self.bits,
                                               group_size=self.group_size, symmetric=self.symmetric)

    def plain(self, buf: torch.Tensor) -> torch.Tensor:
        return self.weight_packed.view(buf).view(torch.uint8)

    def scales_zeros(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zp = self.weight_zero_point.view(buf) if self.weight_zero_point is not None else None
        return quant.compressed_tensors_scales_zeros(self.weight_scale.view(buf), zp, self.bits,
                                                     self.weight_packed.shape[0])

    packed_group_size = GptqMatrix.packed_group_size
    bind = GptqMatrix.bind
    convert_from = GptqMatrix.convert_from


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
        return lambda x: quant.int4_linear(x, packed, group, sz)

    def convert_from(self, src: Matrix, src_buf: torch.Tensor, buf: torch.Tensor) -> None:
        if isinstance(src, Int4Matrix):
            for have, want in zip(src.parts, self.parts, strict=True):
                want.view(buf).copy_(have.view(src_buf))
            return
        scales, zeros = src.scales_zeros(src_buf)  # type: ignore[attr-defined]
        group_size = src.packed_group_size(self.packed.shape[1] * 2)  # type: ignore[attr-defined]
        # Both straight into the slot: no temporaries to fault in and copy (this runs on every disk-tier miss).
        quant.plain_to_cpu_int4(src.plain(src_buf).contiguous(), out=self.packed.view(buf))  # type: ignore[attr-defined]
        quant.int4_scales_and_zeros(scales, zeros, group_size, self.group, out=self.scales_and_zeros.view(buf))


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
        return lambda x: quant.int8_linear(x, w, scales)

    def convert_from(self, src: Matrix, src_buf: torch.Tensor, buf: torch.Tensor) -> None:
        _, scales = quant.int8_kernel_pack(src.unpack(src_buf), out=self.w.view(buf))  # type: ignore[attr-defined]
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


# -- the format ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantFormat:
    """Experts quantized in a released checkpoint format: ``method`` "gptq" or "compressed-tensors"."""

    method: str
    scheme: QuantScheme

    @property
    def name(self) -> str:
        return f"{self.scheme} ({self.method})"

    def tensor_suffixes(self) -> tuple[str, ...]:
        if self.method == "gptq":
            return ("qweight", "qzeros", "scales", "g_idx")
        zero = () if self.scheme.symmetric else ("weight_zero_point",)
        return ("weight_packed", "weight_scale", "weight_shape", *zero)

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        per_word, groups = 32 // self.scheme.bits, self.scheme.groups(in_features)
        if self.method == "gptq":
            return {"qweight": (in_features // per_word, out_features),
                    "qzeros": (groups, -(-out_features // per_word)),
                    "scales": (groups, out_features), "g_idx": (in_features,)}
        shapes = {"weight_packed": (out_features, -(-in_features // per_word)),
                  "weight_scale": (out_features, groups), "weight_shape": (2,)}
        if not self.scheme.symmetric:
            shapes["weight_zero_point"] = (-(-out_features // per_word), groups)
        return shapes

    def dtypes(self, suffix: str) -> tuple[torch.dtype, ...]:
        """The dtypes a tensor of this format may be stored in (the usual one first: sizes are estimated by it)."""
        if suffix in ("scales", "weight_scale"):
            return _FLOATS if self.method == "gptq" else (torch.bfloat16, torch.float16, torch.float32)
        return (torch.int64, torch.int32) if suffix == "weight_shape" else _INTS

    def source_matrix(self, parts: Sequence[Part], out_features: int, in_features: int) -> Matrix:
        s = self.scheme
        if self.method == "gptq":
            return GptqMatrix(*parts, out_features, in_features, s.bits, s.group_size)  # type: ignore[arg-type]
        named = dict(zip(self.tensor_suffixes(), parts, strict=True))
        return PackedMatrix(named["weight_packed"], named["weight_scale"], named["weight_shape"],
                            named.get("weight_zero_point"), s.bits, s.group_size, s.symmetric)

    def slot_matrix(self, out_features: int, in_features: int, device: torch.device,
                    activations: torch.dtype) -> Matrix:
        """The fastest layout that computes this matrix here: a CPU kernel's, else the portable one."""
        s, kernel = self.scheme, quant.kernel_for(out_features, in_features, self.scheme)
        if device.type == "cpu" and activations == torch.bfloat16 and kernel == "int4":
            group = quant.int4_kernel_group(out_features, in_features, s.group_size)
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
        h, i = spec.hidden_size, spec.expert_intermediate_size
        return pack_matrices([self.slot_matrix(out, inn, device, activations) for out, inn in ((i, h), (i, h), (h, i))])

    def dense_parts(self, tensors: Mapping, name: str, shape: tuple[int, ...]) -> dict | None:
        """The suffix -> tensor-info map of a resident projection stored in this format (GPTQ quantizes
        attention: ``X.qweight`` ... instead of ``X.weight``), or None when it is stored as a float."""
        module = name.removesuffix(".weight")
        if name in tensors or len(shape) != 2 or f"{module}.{self.tensor_suffixes()[0]}" not in tensors:
            return None
        return {suffix: (f"{module}.{suffix}", part_shape, self.dtypes(suffix))
                for suffix, part_shape in self.shapes(*shape).items()}

    def dense_weight(self, tensors: Mapping[str, torch.Tensor], name: str, out_features: int,
                     in_features: int) -> torch.Tensor:
        """A resident projection's float32 weight from its stored tensors (dequantized once, at load)."""
        return quant.dequantize(self.unpack(tensors, name, out_features, in_features))

    def unpack(self, tensors: Mapping[str, torch.Tensor], name: str, out_features: int,
               in_features: int) -> QuantizedWeight:
        """One layer's tensors (by suffix) -> QuantizedWeight; errors name ``name`` (a resident projection)."""
        s = self.scheme
        if self.method == "gptq":
            return quant.gptq_unpack(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], s.bits,
                                     s.group_size or -1, name=name, shape=(out_features, in_features))
        return quant.compressed_tensors_unpack(tensors["weight_packed"], tensors["weight_scale"],
                                               tensors["weight_shape"], tensors.get("weight_zero_point"),
                                               bits=s.bits, group_size=s.group_size, symmetric=s.symmetric, name=name)


# -- vendor formats: gpt-oss's MXFP4, DeepSeek's FP8 with block scales ---------------------------------------

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


def vendor_slot(native: ExpertLayout, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                bias: bool) -> ExpertLayout:
    """The slot of a vendor format (MXFP4, FP8 blocks), for which torch has no CPU kernel.

    Measured here (scripts/results/bench_quant.json, one token through a 3584x1024 matrix, 1 thread):
    dequantize-then-matmul costs 2.4 ms in MXFP4 and 4-17 ms in FP8 against 0.21 ms for a bf16 matmul,
    so on CPU a miss dequantizes once into a dense slot of the compute dtype (the RAM tier keeps the
    native bytes) and every hit runs at bf16's rate; the slot is 3.8x (MXFP4) / 2x (FP8) larger, which
    the budget counts. On a GPU, memory is the scarce side and dequantizing per matmul is cheap there,
    so the slot stays native.
    """
    if device.type != "cpu":
        return native
    h, i = spec.hidden_size, spec.expert_intermediate_size
    return pack_matrices([DenseMatrix(Part(0, dtype, (out, inn)), Part(0, dtype, (out,)) if bias else None)
                          for out, inn in ((i, h), (i, h), (h, i))])


@dataclass(frozen=True)
class Mxfp4Format:
    """gpt-oss's released experts (``quant_method: "mxfp4"``): 4.25 bits per weight in every tier."""

    name: str = "mxfp4"

    def dtypes(self, suffix: str) -> tuple[torch.dtype, ...]:
        return (torch.uint8,) if suffix in ("blocks", "scales") else _FLOATS

    def host_layout(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                    activations: torch.dtype) -> ExpertLayout:
        """Gate, up and down de-interleaved, still MXFP4: what the RAM tier holds (4.25 bits per weight)."""
        h, i = spec.hidden_size, spec.expert_intermediate_size
        return pack_matrices([Mxfp4Matrix(Part(0, torch.uint8, (out, inn // 32, 16)),
                                          Part(0, torch.uint8, (out, inn // 32)), Part(0, dtype, (out,)))
                              for out, inn in ((i, h), (i, h), (h, i))])

    def slot_layout(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                    activations: torch.dtype) -> ExpertLayout:
        """On CPU, dequantized once into a dense slot of the compute dtype; on a GPU, MXFP4 (see vendor_slot)."""
        return vendor_slot(self.host_layout(spec, dtype, device, activations), spec, dtype, device, bias=True)

    def dense_parts(self, tensors: Mapping, name: str, shape: tuple[int, ...]) -> None:
        return None  # modules_to_not_convert (attention, router, embeddings, lm_head) stay as stored


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
class Fp8BlockFormat:
    """``quant_method: "fp8"`` with ``weight_block_size`` (DeepSeek-V3/R1, Kimi-K2): ``.weight`` float8_e4m3fn
    and ``.weight_scale_inv`` float32 per block, for experts and every other linear projection."""

    block: tuple[int, int] = (128, 128)

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
                    activations: torch.dtype) -> ExpertLayout:
        """FP8 bytes and float32 block scales: what the RAM tier holds (one byte per weight)."""
        h, i = spec.hidden_size, spec.expert_intermediate_size
        return pack_matrices([Fp8Matrix(*(Part(0, self.dtypes(k)[0] if k == "weight" else torch.float32, shape)
                                          for k, shape in self.shapes(out, inn).items()), self.block)
                              for out, inn in ((i, h), (i, h), (h, i))])

    def slot_layout(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                    activations: torch.dtype) -> ExpertLayout:
        """On CPU, dequantized once into a dense slot of the compute dtype; on a GPU, FP8 (see vendor_slot)."""
        return vendor_slot(self.host_layout(spec, dtype, device, activations), spec, dtype, device, bias=False)

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
