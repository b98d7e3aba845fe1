"""safetensors files: every header parsed and validated (a documented 8-byte length + JSON), across shards.

Headers are parsed here, not by the safetensors library, because the disk tier needs each tensor's absolute
byte offset to read experts on demand; dense tensors are loaded with ``safetensors.safe_open`` (memory-mapped,
never pickle).
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

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
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"  # what transformers' save_pretrained writes


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file (symlinks followed): a FIFO or a device named like a
    shard would block or stream forever. O_NONBLOCK makes opening a FIFO return at once, to be refused."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist", "re-download the checkpoint") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path} is not a regular file", "point at the checkpoint's real safetensors files")
    return os.fdopen(fd, "rb")


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one file's header: every tensor's range lies inside the file, and the ranges tile
    the data without overlapping (as the format requires), so no two tensors share bytes. Error messages name
    the file and tensor, never the file's bytes."""
    hint = "the file is truncated or corrupt: re-download it"
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is too short to be a safetensors file", hint)
        (header_len,) = struct.unpack("<Q", raw)
        if header_len == 0 or header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path} is not a safetensors file (its first 8 bytes are not the length of a "
                                  f"header inside its {size} bytes)", hint)
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CheckpointError(f"{path} has a corrupt safetensors header", hint) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header", hint)
    data_start = 8 + header_len
    tensors = {name: _tensor_info(path, name, meta, data_start, size, hint)
               for name, meta in header.items() if name != "__metadata__"}
    _check_tiling(path, tensors.values(), data_start, size, hint)
    return tensors


def _tensor_info(path: Path, name: str, meta: object, data_start: int, size: int, hint: str) -> TensorInfo:
    try:
        dtype_name, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]  # type: ignore
        if not all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)):
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry", hint) from None
    if dtype_name not in SAFETENSORS_DTYPES:
        raise UnsupportedModelError(
            f"{path}: tensor {name!r} is stored as {dtype_name}",
            "offload reads float32/bfloat16/float16 weights and GPTQ or compressed-tensors int4/int8 ones",
        )
    dtype = SAFETENSORS_DTYPES[dtype_name]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"{path}: tensor {name!r} has a byte range that does not match its shape", hint)
    if data_start + end > size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size}", hint
        )
    return TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)


def _check_tiling(path: Path, tensors: Iterable[TensorInfo], data_start: int, size: int, hint: str) -> None:
    """The tensors' ranges, in order, start at the data and follow each other without gap or overlap (what the
    safetensors library itself checks before reading dense tensors; the disk tier reads experts by offset, so it
    must hold there too: overlapping experts would silently compute garbage)."""
    cursor, previous = data_start, None
    for info in sorted(tensors, key=lambda t: (t.start, t.end)):
        if info.start != cursor:
            what = f"overlaps tensor {previous!r}" if info.start < cursor else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {info.name!r} {what}", hint)
        cursor, previous = info.end, info.name
    if cursor != size:
        raise CheckpointError(f"{path}: {size - cursor} bytes after the last tensor belong to none", hint)


def _shard_path(model_dir: Path, name: object, index_path: Path) -> Path:
    """A shard the index names, inside the checkpoint folder: a relative path without ``..``. The name is checked,
    not where it resolves: a hub cache's snapshot folder holds symlinks into its blobs folder, which are fine."""
    if not isinstance(name, str) or not name or "\\" in name:
        raise CheckpointError(f"{index_path} names a shard {name!r} that is not a file name",
                              "re-download the checkpoint")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts or not parts:
        raise CheckpointError(f"{index_path} names a shard outside the checkpoint folder ({name!r})",
                              "shards must lie in the folder that holds the index: re-download the checkpoint")
    return model_dir.joinpath(*parts)


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files, as transformers reads them: the shards model.safetensors.index.json lists,
    else model.safetensors (other .safetensors files beside it, a predictor's or an adapter's, are not weights)."""
    index_path = model_dir / INDEX
    if index_path.is_file():
        weight_map = read_json_if_present(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no weight_map", "re-download the checkpoint")
        paths = sorted({_shard_path(model_dir, name, index_path) for name in weight_map.values()})
        for path in paths:
            if not path.exists():
                raise CheckpointError(f"shard {path} listed in {index_path.name} is missing",
                                      "re-download the checkpoint")
        return paths
    if (model_dir / SINGLE).exists() or (model_dir / SINGLE).is_symlink():
        return [model_dir / SINGLE]
    found = sorted(p.name for p in model_dir.glob("*.safetensors"))
    hint = f"found {', '.join(found[:4])}: name the weights {SINGLE} or add {INDEX}" if found else \
        "offload reads safetensors only (never pickle .bin files)"
    raise CheckpointError(f"no {SINGLE} or {INDEX} in {model_dir}", hint)


def index_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, across shards, with its file and byte range."""
    tensors: dict[str, TensorInfo] = {}
    for path in weight_files(model_dir):
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


def write_safetensors(groups: Iterable[dict[str, torch.Tensor]], path: Path, metadata: dict[str, str]) -> None:
    """Write tensors in the order given, each group's back to back (safetensors allows any data order; its own
    writer sorts by dtype, which put a quantized expert's codes and scales hundreds of MB apart: 2-3 reads per miss).

    Within a group tensors go widest dtype first. safetensors requires the data to tile (no padding), so a group
    whose bytes are not a multiple of 8 would shift every later tensor: such groups are split up and sorted widest
    first after the aligned ones. Every tensor then starts at a multiple of its element size, which readers that
    view bytes in place (offload's disk tier, torch.frombuffer) need.
    """
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    ordered = [sorted(g.items(), key=lambda kv: -kv[1].element_size()) for g in groups]
    aligned = [g for g in ordered if sum(t.numel() * t.element_size() for _, t in g) % 8 == 0]
    rest = sorted((kv for g in ordered if g not in aligned for kv in g), key=lambda kv: -kv[1].element_size())
    items = [kv for g in aligned for kv in g] + rest
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, t in items:
            f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
