"""GPTQ v1 checkpoints (AutoGPTQ / GPTQModel ``checkpoint_format: "gptq"``), read as released.

qweight int32 [in*bits/32, out] packs consecutive input rows into one word; qzeros int32 [groups, out*bits/32]
packs consecutive output columns and stores zero - 1 (AutoGPTQ's pack does zeros -= 1, its dequantization adds 1
back and masks, so zero 0 survives as 2^bits - 1); scales fp16 [groups, out]; g_idx int32 [in] (i // group
without act-order). W[o, i] = s * (q[i, o] - zero).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from offload.errors import CheckpointError, ConfigError, UnsupportedModelError
from offload.experts.formats.base import FLOATS
from offload.experts.formats.integer import IntegerFormat, StoredMatrix
from offload.experts.layouts import Matrix, Part
from offload.experts.quant import (
    QuantizedWeight,
    QuantScheme,
    check_bits,
    expect_tensor,
    pack_words,
    require_little_endian,
    unpack_words,
)


def gptq_plain(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight [in*bits/32, out] -> the plain packing [out, in*bits/8] (nibbles for 4-bit, codes for 8-bit).

    A word-level transpose is all it takes, since a word holds consecutive inputs of one output: ~190 us for a
    3584 x 1024 matrix, so GPTQ -> CPU int4 layout is this plus plain_to_cpu_int4.
    """
    require_little_endian()
    return qweight.t().contiguous().view(torch.uint8)


def _gptq_groups(in_features: int, group_size: int) -> int:
    group = in_features if group_size in (-1, None, 0) else group_size
    if group < 1 or in_features % group:
        raise CheckpointError(f"GPTQ group_size {group_size} does not divide the input dimension {in_features}",
                              "the tensors do not match the checkpoint's quantization_config")
    return in_features // group


def gptq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                bits: int, group_size: int, *, name: str = "weight",
                shape: tuple[int, int] | None = None) -> QuantizedWeight:
    """A GPTQ v1 linear layer -> QuantizedWeight. name: the layer's prefix, for errors; shape: (out, in) expected.

    group_size -1 means one group per row. Act-order (a g_idx that is not i // group) raises: supporting it
    would need the runtime to permute activations (sort inputs by g_idx, keep the permutation).
    """
    check_bits(bits, "GPTQ")
    per_word = 32 // bits
    if shape is None:
        shape = (qweight.shape[-1], qweight.shape[0] * per_word)
    out, in_ = shape
    groups = _gptq_groups(in_, group_size)
    what = f"a {bits}-bit GPTQ [{out}, {in_}] layer with {groups} group(s)"
    expect_tensor(qweight, f"{name}.qweight", (in_ // per_word, out), (torch.int32,), what)
    expect_tensor(qzeros, f"{name}.qzeros", (groups, -(-out // per_word)), (torch.int32,), what)
    expect_tensor(scales, f"{name}.scales", (groups, out), (torch.float16, torch.bfloat16, torch.float32), what)
    if g_idx is not None:
        expect_tensor(g_idx, f"{name}.g_idx", (in_,), (torch.int32, torch.int64), what)
        if not torch.equal(g_idx.long(), torch.arange(in_, device=g_idx.device) // (in_ // groups)):
            raise UnsupportedModelError(f"tensor {name + '.g_idx'!r} is act-order (desc_act) GPTQ",
                                        "offload reads GPTQ checkpoints quantized with desc_act false")
    scheme = QuantScheme(bits, None if groups == 1 else in_ // groups, True)
    codes = unpack_words(qweight.t(), bits)  # [out, in]
    zeros = ((unpack_words(qzeros, bits)[:, :out].int() + 1) & scheme.maxq).t().float()  # [out, groups]
    symmetric = bool((zeros == scheme.mid).all())
    scheme = QuantScheme(bits, scheme.group_size, symmetric)
    return QuantizedWeight(codes, scales.t().float().contiguous(), zeros.contiguous(), scheme)


def gptq_scales_zeros(qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
                      out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Only a GPTQ layer's scales and zero points, float32 [out, groups] each (no codes unpacked)."""
    maxq = (1 << bits) - 1
    zeros = ((unpack_words(qzeros, bits)[:, :out_features].int() + 1) & maxq).t().float()
    return scales.t().float().contiguous(), zeros.contiguous()


def gptq_pack(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """QuantizedWeight -> {qweight, qzeros, scales (fp16), g_idx} as AutoGPTQ writes them (v1, desc_act false)."""
    in_, groups = q.shape[1], q.scales.shape[1]
    if in_ % (32 // q.scheme.bits):
        raise ConfigError(f"GPTQ packs {32 // q.scheme.bits} inputs per word: input dimension {in_} does not divide")
    stored_zeros = (q.zeros.to(torch.int32) - 1) & q.scheme.maxq  # zero - 1, masked to its field (see above)
    return {
        "qweight": pack_words(q.codes, q.scheme.bits).t().contiguous(),  # [in*bits/32, out]
        "qzeros": pack_words(stored_zeros.t().to(torch.uint8), q.scheme.bits),  # [groups, out*bits/32]
        "scales": q.scales.t().to(torch.float16).contiguous(),  # [groups, out]
        "g_idx": (torch.arange(in_, device=q.codes.device) // (in_ // groups)).to(torch.int32),
    }


def gptq_scheme(quantization_config: dict) -> QuantScheme:
    """The scheme of a GPTQ quantization_config; raises on what gptq_unpack cannot read."""
    qc = quantization_config
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt != "gptq":
        raise UnsupportedModelError(f"GPTQ checkpoint_format {fmt!r} is not supported", "offload reads GPTQ v1 (gptq)")
    if qc.get("desc_act"):
        raise UnsupportedModelError("GPTQ with desc_act (act-order) is not supported",
                                    "use a checkpoint quantized with desc_act false")
    bits = int(qc.get("bits", 4))
    check_bits(bits, "GPTQ")
    group = qc.get("group_size", 128)
    return QuantScheme(bits, None if group in (-1, None) else int(group), bool(qc.get("sym", True)))


@dataclass(frozen=True)
class GptqMatrix(StoredMatrix):
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
        return gptq_unpack(self.qweight.view(buf), self.qzeros.view(buf), self.scales.view(buf), None,
                           self.bits, self.group_size or -1, shape=(self.out_features, self.in_features))

    def plain(self, buf: torch.Tensor) -> torch.Tensor:
        """The codes in plain packing [out, in*bits/8]: a word transpose."""
        return gptq_plain(self.qweight.view(buf), self.bits)

    def scales_zeros(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return gptq_scales_zeros(self.qzeros.view(buf), self.scales.view(buf), self.bits, self.out_features)


@dataclass(frozen=True)
class GptqFormat(IntegerFormat):
    """``quant_method: "gptq"``: AutoGPTQ / GPTQModel v1, 4 or 8 bits, any group, sym or asym, desc_act false."""

    quant_method: ClassVar[str] = "gptq"

    read_scheme = staticmethod(gptq_scheme)

    def tensor_suffixes(self) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales", "g_idx")

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        per_word, groups = 32 // self.scheme.bits, self.scheme.groups(in_features)
        return {"qweight": (in_features // per_word, out_features), "qzeros": (groups, -(-out_features // per_word)),
                "scales": (groups, out_features), "g_idx": (in_features,)}

    def dtypes(self, suffix: str) -> tuple[torch.dtype, ...]:
        return FLOATS if suffix == "scales" else (torch.int32, torch.int64)

    def source_matrix(self, parts: Sequence[Part], out_features: int, in_features: int) -> Matrix:
        s = self.scheme
        return GptqMatrix(*parts, out_features, in_features, s.bits, s.group_size)  # type: ignore[arg-type]

    def unpack(self, tensors: Mapping[str, torch.Tensor], name: str, out_features: int,
               in_features: int) -> QuantizedWeight:
        s = self.scheme
        return gptq_unpack(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], s.bits,
                           s.group_size or -1, name=name, shape=(out_features, in_features))
