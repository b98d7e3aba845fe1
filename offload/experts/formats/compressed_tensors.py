"""compressed-tensors ``pack-quantized`` checkpoints (llm-compressor's w4a16 / w8a16, Kimi-K2's int4), read as
released and written by ``offload quantize``.

weight_packed int32 [out, ceil(in*bits/32)] holds signed codes + 2^(bits-1), low bits first, so on a little-endian
host its bytes are the plain packing; weight_scale [out, groups] (one group per row for strategy "channel");
weight_shape int [2] = (out, in); asymmetric only: weight_zero_point int32 [ceil(out*bits/32), groups], the signed
zero point + 2^(bits-1) packed along the output dimension. W = scale * (q_signed - zp_signed) = scale * (code -
zero) with both in unsigned code space.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from offload.errors import CheckpointError, ConfigError, UnsupportedModelError
from offload.experts.formats.integer import IntegerFormat, StoredMatrix
from offload.experts.layouts import Matrix, Part
from offload.experts.quant import QuantizedWeight, QuantScheme, check_bits, expect_tensor, pack_words, unpack_words


def compressed_tensors_unpack(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_shape: torch.Tensor,
                              weight_zero_point: torch.Tensor | None = None, *, bits: int,
                              group_size: int | None, symmetric: bool, name: str = "") -> QuantizedWeight:
    """A compressed-tensors pack-quantized layer -> QuantizedWeight. group_size None: strategy "channel"."""
    check_bits(bits, "compressed-tensors")
    per_word = 32 // bits
    prefix = f"{name}." if name else ""
    expect_tensor(weight_shape, f"{prefix}weight_shape", (2,), (torch.int32, torch.int64), "a 2-D weight's shape")
    out, in_ = (int(v) for v in weight_shape.tolist())
    scheme = QuantScheme(bits, group_size, symmetric)
    try:
        groups = scheme.groups(in_)
    except ConfigError:
        raise CheckpointError(f"group_size {group_size} does not divide {prefix}weight_shape's input dimension {in_}",
                              "the tensors do not match the checkpoint's quantization_config") from None
    what = f"a {bits}-bit pack-quantized [{out}, {in_}] layer with {groups} group(s)"
    expect_tensor(weight_packed, f"{prefix}weight_packed", (out, -(-in_ // per_word)), (torch.int32,), what)
    expect_tensor(weight_scale, f"{prefix}weight_scale", (out, groups), (torch.bfloat16, torch.float16, torch.float32),
                  what)
    codes = unpack_words(weight_packed, bits)[:, :in_].contiguous()
    if symmetric:
        zeros = torch.full((out, groups), float(scheme.mid), device=weight_packed.device)
    else:
        if weight_zero_point is None:
            raise CheckpointError(f"tensor {prefix + 'weight_zero_point'!r} is missing from an asymmetric layer",
                                  "the tensors do not match the checkpoint's quantization_config")
        expect_tensor(weight_zero_point, f"{prefix}weight_zero_point", (-(-out // per_word), groups), (torch.int32,),
                      what)
        zeros = unpack_words(weight_zero_point.t(), bits)[:, :out].t().float().contiguous()  # [out, groups]
    return QuantizedWeight(codes, weight_scale.float().contiguous(), zeros, scheme)


def compressed_tensors_scales_zeros(weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None, bits: int,
                                    out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Only a pack-quantized layer's scales and zero points, float32 [out, groups] each (no codes unpacked)."""
    scales = weight_scale.float().contiguous()
    if weight_zero_point is None:  # symmetric
        return scales, torch.full_like(scales, float(1 << (bits - 1)))
    return scales, unpack_words(weight_zero_point.t(), bits)[:, :out_features].t().float().contiguous()


def compressed_tensors_pack(q: QuantizedWeight, scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """QuantizedWeight -> {weight_packed, weight_scale, weight_shape[, weight_zero_point]} as llm-compressor writes."""
    out, in_ = q.shape
    tensors = {
        "weight_packed": pack_words(q.codes, q.scheme.bits),  # [out, ceil(in*bits/32)]
        "weight_scale": q.scales.to(scale_dtype).contiguous(),  # [out, groups]
        "weight_shape": torch.tensor([out, in_], dtype=torch.int64),
    }
    if not q.scheme.symmetric:
        zeros = q.zeros.t().to(torch.uint8)  # [groups, out]
        tensors["weight_zero_point"] = pack_words(zeros, q.scheme.bits).t().contiguous()  # [ceil(out*bits/32), groups]
    elif not bool((q.zeros == q.scheme.mid).all()):
        raise ConfigError(f"a symmetric {q.scheme} matrix must have every zero point at {q.scheme.mid}")
    return tensors


def compressed_tensors_config(scheme: QuantScheme, ignore: list[str], targets: tuple[str, ...] = ("Linear",)) -> dict:
    """The quantization_config block of a pack-quantized checkpoint (as in Kimi-K2's config.json)."""
    weights = {
        "actorder": None, "block_structure": None, "dynamic": False,
        "group_size": scheme.group_size, "num_bits": scheme.bits, "observer": "minmax", "observer_kwargs": {},
        "strategy": "channel" if scheme.group_size is None else "group", "symmetric": scheme.symmetric,
        "type": "int",
    }
    group = {"input_activations": None, "output_activations": None, "targets": list(targets), "weights": weights}
    return {"config_groups": {"group_0": group}, "format": "pack-quantized", "ignore": list(ignore),
            "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}


def compressed_tensors_scheme(quantization_config: dict) -> QuantScheme:
    """The scheme of a compressed-tensors quantization_config; raises on what compressed_tensors_unpack cannot read."""
    qc = quantization_config
    hint = "offload reads pack-quantized int4/int8 weight-only checkpoints with one config group"
    if qc.get("format") != "pack-quantized":
        raise UnsupportedModelError(f"compressed-tensors format {qc.get('format')!r} is not supported", hint)
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1 or not isinstance(groups[0].get("weights"), dict):
        raise UnsupportedModelError(f"compressed-tensors config with {len(groups)} config groups", hint)
    w = groups[0]["weights"]
    if groups[0].get("input_activations") or w.get("type") != "int" or w.get("strategy") not in ("group", "channel"):
        raise UnsupportedModelError(f"compressed-tensors weights {w.get('type')}/{w.get('strategy')} with "
                                    f"activations {groups[0].get('input_activations')}", hint)
    if w.get("actorder") == "group":
        raise UnsupportedModelError("compressed-tensors with actorder 'group' (weight_g_idx) is not supported", hint)
    bits = int(w["num_bits"])
    check_bits(bits, "compressed-tensors")
    if w.get("strategy") == "group" and not w.get("group_size"):
        raise UnsupportedModelError("compressed-tensors strategy 'group' without a group_size", hint)
    group = None if w.get("strategy") == "channel" else int(w["group_size"])
    return QuantScheme(bits, group, bool(w.get("symmetric", True)))


def compressed_tensors_ignored(module: str, ignore: list[str]) -> bool:
    """Whether a module name is in a compressed-tensors ``ignore`` list (exact names, or "re:" + regex)."""
    return any(re.match(p[3:], module) if p.startswith("re:") else p == module for p in ignore)


@dataclass(frozen=True)
class PackedMatrix(StoredMatrix):
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
        return compressed_tensors_unpack(self.weight_packed.view(buf), self.weight_scale.view(buf),
                                         self.weight_shape.view(buf), zp, bits=self.bits,
                                         group_size=self.group_size, symmetric=self.symmetric)

    @property
    def plain_part(self) -> Part:
        """The packed words as the plain packing's bytes [out, in * bits / 8] (little-endian words: the first code
        in the low bits), where they lie."""
        rows, words = self.weight_packed.shape
        return Part(self.weight_packed.offset, torch.uint8, (rows, words * 4))

    def plain(self, buf: torch.Tensor) -> torch.Tensor:
        return self.plain_part.view(buf)

    def scales_zeros(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zp = self.weight_zero_point.view(buf) if self.weight_zero_point is not None else None
        return compressed_tensors_scales_zeros(self.weight_scale.view(buf), zp, self.bits,
                                               self.weight_packed.shape[0])


@dataclass(frozen=True)
class CompressedTensorsFormat(IntegerFormat):
    """``quant_method: "compressed-tensors"``, format pack-quantized: int4 / int8 weight-only, one config group."""

    quant_method: ClassVar[str] = "compressed-tensors"

    read_scheme = staticmethod(compressed_tensors_scheme)

    def tensor_suffixes(self) -> tuple[str, ...]:
        zero = () if self.scheme.symmetric else ("weight_zero_point",)
        return ("weight_packed", "weight_scale", "weight_shape", *zero)

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        per_word, groups = 32 // self.scheme.bits, self.scheme.groups(in_features)
        shapes = {"weight_packed": (out_features, -(-in_features // per_word)),
                  "weight_scale": (out_features, groups), "weight_shape": (2,)}
        if not self.scheme.symmetric:
            shapes["weight_zero_point"] = (-(-out_features // per_word), groups)
        return shapes

    def dtypes(self, suffix: str) -> tuple[torch.dtype, ...]:
        if suffix == "weight_scale":
            return (torch.bfloat16, torch.float16, torch.float32)
        return (torch.int64, torch.int32) if suffix == "weight_shape" else (torch.int32, torch.int64)

    def source_matrix(self, parts: Sequence[Part], out_features: int, in_features: int) -> Matrix:
        s = self.scheme
        named = dict(zip(self.tensor_suffixes(), parts, strict=True))
        return PackedMatrix(named["weight_packed"], named["weight_scale"], named["weight_shape"],
                            named.get("weight_zero_point"), s.bits, s.group_size, s.symmetric)

    def unpack(self, tensors: Mapping[str, torch.Tensor], name: str, out_features: int,
               in_features: int) -> QuantizedWeight:
        s = self.scheme
        return compressed_tensors_unpack(tensors["weight_packed"], tensors["weight_scale"], tensors["weight_shape"],
                                         tensors.get("weight_zero_point"), bits=s.bits, group_size=s.group_size,
                                         symmetric=s.symmetric, name=name)
