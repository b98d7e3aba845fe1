"""Where a checkpoint's tensors are: TensorInfo (file, absolute byte range, dtype, shape), whatever the file
format, and the check that an expected tensor is there with its shape and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from offload.errors import CheckpointError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute byte range, dtype and shape."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    end: int    # one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def check_tensor(tensors: dict[str, TensorInfo], name: str, shape: tuple[int, ...],
                 dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> TensorInfo:
    """The tensor's info, or a clear error naming it when it is missing, mis-shaped or of the wrong dtype."""
    info = tensors.get(name)
    if info is None:
        raise CheckpointError(f"tensor {name!r} is missing from the checkpoint",
                              "the files do not match config.json: re-download or fix the config")
    if tuple(info.shape) != tuple(shape):
        raise CheckpointError(
            f"tensor {name!r} in {info.path.name} has shape {list(info.shape)}, "
            f"expected {list(shape)} from config.json",
            "the weights do not match config.json",
        )
    if info.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise CheckpointError(f"tensor {name!r} in {info.path.name} is {str(info.dtype).removeprefix('torch.')}, "
                              f"expected {want}", "the weights do not match config.json's quantization_config")
    return info
