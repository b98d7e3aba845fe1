"""The ggml tensor types a GGUF file may store weights in: one table, by ggml's own type names.

Each row says how the type lays a row of weights out on disk (``block_size`` weights in ``type_size`` bytes, rows
independent, so one expert's slice of a stacked tensor and one row range of a matrix are contiguous bytes) and how it
becomes float32 (``dequantize``). Plain types (F32, F16, BF16) are a torch dtype and need no decoding; block types are
decoded by ggml-org's own reference (``gguf.quants.dequantize``, pure numpy), which is also the tests' oracle.

``native`` marks a type with a kernel that computes straight from its blocks (experts/kernels: block-wise int8
activations, as llama.cpp does); the others are dequantized once per miss into a slot of the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as _gguf_dequantize

from offload.errors import UnsupportedModelError
from offload.experts.kernels.linear import GGML_KINDS


@dataclass(frozen=True)
class GgmlType:
    """One ggml tensor type: its block geometry, its float dtype if it is a plain one, and how it decodes."""

    name: str                       # ggml's spelling: "Q4_K", "F16", ...
    block_size: int                 # weights per block (1 for plain types)
    type_size: int                  # bytes per block
    dtype: torch.dtype | None = None  # plain types: the torch dtype their bytes are
    native: bool = False            # computed from its blocks by offload's kernels (kernels/linear.py GGML_KINDS)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.type_size <= 0:
            raise ValueError(f"ggml type {self.name}: block {self.block_size} x {self.type_size} bytes")

    @property
    def quantized(self) -> bool:
        return self.dtype is None

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size

    def row_nbytes(self, columns: int) -> int:
        """Bytes of one row of ``columns`` weights; a row must be whole blocks."""
        if columns % self.block_size:
            raise UnsupportedModelError(f"{columns} columns are not whole {self.name} blocks of {self.block_size}",
                                        "the file is corrupt or not a valid GGUF")
        return columns // self.block_size * self.type_size

    def dequantize(self, raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Bytes ``raw`` (uint8, rows of ``row_nbytes``) -> float32 ``shape`` [..., columns]."""
        if self.dtype is not None:
            return raw.reshape(-1).view(self.dtype).view(shape).float()
        rows = raw.reshape(-1, self.row_nbytes(shape[-1])).numpy()
        values = _gguf_dequantize(rows, GGMLQuantizationType[self.name])
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(shape)


def _block_type(name: str) -> GgmlType:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    return GgmlType(name, block, size, native=name in GGML_KINDS)


# The types offload reads: the plain ones, the legacy and K-quant blocks, MXFP4 (gpt-oss) and the non-linear IQ4 ones
# (IQ4_NL / IQ4_XS, common in "UD" and imatrix quants). Others (the IQ1-IQ3 codebooks, TQ ternary) are refused by name.
GGML_TYPES: dict[str, GgmlType] = {
    t.name: t for t in (
        GgmlType("F32", 1, 4, torch.float32), GgmlType("F16", 1, 2, torch.float16),
        GgmlType("BF16", 1, 2, torch.bfloat16),
        *(_block_type(name) for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                                         "Q6_K", "MXFP4", "IQ4_NL", "IQ4_XS")),
    )
}


def ggml_type(name: str, where: str = "") -> GgmlType:
    """The table's row for ``name``, or an error naming the type, ``where`` it was found and what is read."""
    row = GGML_TYPES.get(name)
    if row is None:
        raise UnsupportedModelError(f"{where}{' is stored as ' if where else 'ggml type '}{name}, which offload "
                                    "cannot read yet", f"offload reads {', '.join(GGML_TYPES)}; "
                                    "pick a GGUF file quantized to one of them")
    return row
