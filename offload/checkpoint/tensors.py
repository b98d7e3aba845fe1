"""Where a checkpoint's tensors are: TensorInfo (file, absolute byte range, dtype, shape), whatever the file
format, the check that an expected tensor is there with its shape and dtype, and the one way a resident tensor is
read: its byte range, straight from the file (safetensors and GGUF alike; never pickle, nothing executed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from offload.errors import CheckpointError
from offload.experts.formats.ggml import ggml_type

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute byte range, dtype and shape.

    A GGUF tensor names its ggml type in ``encoding``; a block-quantized one (Q4_K, ...) has ``dtype`` float32, what
    its values decode to, and its bytes are rows of blocks (``stored_dtype`` / ``stored_shape``)."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    end: int    # one past the last byte
    encoding: str = ""  # GGUF: the ggml type ("F16", "Q4_K", ...); "" for safetensors

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def blocks(self) -> bool:
        """Whether the bytes are ggml blocks rather than elements of ``dtype``."""
        return bool(self.encoding) and ggml_type(self.encoding).quantized

    @property
    def stored_dtype(self) -> torch.dtype:
        return torch.uint8 if self.blocks else self.dtype

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the bytes as ``stored_dtype``: block rows are [..., bytes per row]."""
        if not self.blocks:
            return self.shape
        rows = math.prod(self.shape[:-1])
        return (*self.shape[:-1], self.nbytes // rows)


MERGE_GAP = 1 << 16  # read across a small gap between an expert's tensors rather than issuing two reads


@dataclass(frozen=True)
class ReadRun:
    """Tensors of one expert that lie (nearly) back to back in one file: one read."""

    path: Path
    start: int
    end: int
    tensors: tuple[tuple[int, TensorInfo], ...]  # (index in the expert's tensor list; info)


def read_runs(tensors: Sequence[TensorInfo]) -> list[ReadRun]:
    """The reads that fetch ``tensors`` (one expert's), in file order: neighbours at most MERGE_GAP apart share one.
    What a disk miss costs in requests: one for `offload quantize`'s output, one per stacked tensor in a GGUF file."""
    order = sorted(enumerate(tensors), key=lambda it: (str(it[1].path), it[1].start))
    runs: list[list[tuple[int, TensorInfo]]] = []
    for idx, info in order:
        last = runs[-1][-1][1] if runs else None
        if last is not None and last.path == info.path and 0 <= info.start - last.end <= MERGE_GAP:
            runs[-1].append((idx, info))
        else:
            runs.append([(idx, info)])
    return [ReadRun(r[0][1].path, r[0][1].start, r[-1][1].end, tuple(r)) for r in runs]


def check_tensor(tensors: Mapping[str, TensorInfo], name: str, shape: tuple[int, ...],
                 dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> TensorInfo:
    """The tensor's info, or a clear error naming it (as the file does) when it is missing, mis-shaped or of the
    wrong dtype."""
    info = tensors.get(name)
    if info is None:
        raise CheckpointError(f"tensor {name!r} is missing from the checkpoint",
                              "the files do not match config.json: re-download or fix the config")
    if tuple(info.shape) != tuple(shape):
        raise CheckpointError(
            f"tensor {info.name!r} in {info.path.name} has shape {list(info.shape)}, "
            f"expected {list(shape)} from the model's config",
            "the weights do not match the config (config.json, or the GGUF metadata)",
        )
    if info.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise CheckpointError(f"tensor {info.name!r} in {info.path.name} is {str(info.dtype).removeprefix('torch.')}, "
                              f"expected {want}", "the weights do not match config.json's quantization_config")
    return info


class DenseWeight(Protocol):
    """What makes a resident float weight out of stored tensors: a format's ``dense_weight`` (GPTQ attention, FP8
    projections), or a layout conversion (GGUF's MLA k_b / v_b back into kv_b)."""

    def dense_weight(self, tensors: Mapping[str, torch.Tensor], name: str, out_features: int,
                     in_features: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class QuantizedTensor:
    """A resident projection made from stored parts (quantized, or split as another engine lays it out): made into a
    float32 weight once, at load, by ``fmt.dense_weight``."""

    name: str                      # the ``.weight`` it stands for
    parts: dict[str, TensorInfo]   # by suffix (qweight, qzeros, ... / weight, weight_scale_inv / k_b, v_b)
    fmt: DenseWeight
    shape: tuple[int, int]         # (out, in)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts.values())


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """The tensor's values from its byte range: as stored for a plain dtype, float32 for ggml blocks."""
    raw = read_bytes(info)
    if info.blocks:
        return ggml_type(info.encoding).dequantize(raw, info.shape)
    return raw.view(info.dtype).view(info.shape)


def read_bytes(info: TensorInfo) -> torch.Tensor:
    """The tensor's byte range as it is stored (uint8), checked whole."""
    raw = torch.empty(info.nbytes, dtype=torch.uint8)
    try:
        with open(info.path, "rb") as f:
            f.seek(info.start)
            got = f.readinto(memoryview(raw.numpy()))
    except OSError as e:
        raise CheckpointError(f"cannot read tensor {info.name!r} from {info.path} ({e.strerror})",
                              "check the file is readable") from None
    if got != info.nbytes:
        raise CheckpointError(f"{info.path} is truncated: tensor {info.name!r} ends at byte {info.end} but the file "
                              f"has {os.path.getsize(info.path)}", "the file is truncated or corrupt: re-download it")
    return raw
