"""safetensors files: every header parsed and validated (a documented 8-byte length + JSON), across shards.

Headers are parsed here, not by the safetensors library, because the disk tier needs each tensor's absolute
byte offset to read experts on demand; dense tensors are loaded with ``safetensors.safe_open`` (memory-mapped,
never pickle).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from offload.checkpoint.locate import read_json_if_present
from offload.checkpoint.tensors import TensorInfo
from offload.errors import CheckpointError, UnsupportedModelError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    # integer tensors hold quantized weights (GPTQ qweight/qzeros/g_idx, compressed-tensors weight_packed/shape)
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F8_E4M3": torch.float8_e4m3fn,  # DeepSeek-V3's FP8 weights (with block scales)
}


_MAX_HEADER = 100 * 2**20


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one file's header: every tensor's range must lie inside the file."""
    size = path.stat().st_size
    hint = "the file is truncated or corrupt: re-download it"
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is too short to be a safetensors file", hint)
        (header_len,) = struct.unpack("<Q", raw)
        if header_len == 0 or header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path} has an invalid safetensors header length ({header_len})", hint)
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has a corrupt safetensors header", hint) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header", hint)
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry", hint) from None
        if dtype_name not in SAFETENSORS_DTYPES:
            raise UnsupportedModelError(
                f"{path}: tensor {name!r} is stored as {dtype_name}",
                "offload reads float32/bfloat16/float16 weights and GPTQ or compressed-tensors int4/int8 ones",
            )
        dtype = SAFETENSORS_DTYPES[dtype_name]
        numel = 1
        for d in shape:
            numel *= int(d)
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has a byte range that does not match its shape", hint)
        if data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size}", hint
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)
    return tensors


def index_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, across shards, with its file and byte range."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = read_json_if_present(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path} has no weight_map", "re-download the checkpoint")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (model_dir / name).is_file():
                raise CheckpointError(f"shard {model_dir / name} listed in {index_path.name} is missing",
                                      "re-download the checkpoint")
        paths = [model_dir / name for name in files]
    else:
        paths = sorted(model_dir.glob("*.safetensors"))
        if not paths:
            hint = "offload reads safetensors only (never pickle .bin files)"
            raise CheckpointError(f"no *.safetensors files in {model_dir}", hint)
    tensors: dict[str, TensorInfo] = {}
    for path in paths:
        tensors.update(read_safetensors_header(path))
    return tensors


# Multimodal wrappers keep their text model under a prefix (Qwen3.5's and Gemma-4's ForConditionalGeneration:
# model.language_model.*; Kimi-K2.6 and LLaVA-style ones: language_model.model.*, language_model.lm_head.*).
_TEXT_MODEL_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                        ("language_model.lm_head.", "lm_head."))


def language_model_tensors(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The text model's tensors under the names of a text-only checkpoint (``model.layers.N...``, ``lm_head``), so
    one family adapter reads both; each TensorInfo keeps its name in the file. Vision towers keep their names and
    are never read."""
    if any(name.startswith("model.layers.") for name in tensors):
        return tensors
    renamed = {}
    for name, info in tensors.items():
        for wrapped, plain in _TEXT_MODEL_PREFIXES:
            if name.startswith(wrapped):
                name = plain + name[len(wrapped):]
                break
        renamed[name] = info
    return renamed
