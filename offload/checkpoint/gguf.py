"""GGUF files (llama.cpp's format): metadata key/values and every tensor's place, across the parts of a split set.

The header is parsed by ggml-org's own reader (``gguf.GGUFReader``, pure Python + numpy; nothing in a file is
executed), which memory-maps the file only while reading the header: its metadata is copied into plain Python values
and each tensor becomes a TensorInfo (absolute byte range, ggml type, shape in torch's order: ggml lists the innermost
dimension first) that is checked against the file's size, so a truncated file, an offset beyond the end or a type
offload cannot read fails here, in one line naming the file and tensor, before any weight is read.

A split set (``NAME-00001-of-00003.gguf``, llama.cpp's ``gguf-split``) is read from its first part: every part must
be there, and the first part's metadata (``split.count``) must agree with the names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from offload.checkpoint.tensors import TensorInfo
from offload.errors import CheckpointError, UnsupportedModelError
from offload.experts.formats.ggml import ggml_type

SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
CORRUPT = "the file is truncated or corrupt: re-download it"


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def split_parts(path: Path) -> list[Path]:
    """The files of the set ``path`` belongs to (itself alone when it is not a split part), every part checked."""
    m = SPLIT_RE.match(path.name)
    if m is None:
        return [path]
    count = int(m["count"])
    parts = [path.with_name(f"{m['stem']}-{n:05d}-of-{count:05d}.gguf") for n in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise CheckpointError(f"split GGUF set {parts[0].name} is missing part(s) {', '.join(missing)} in "
                              f"{path.parent}", "download every part of the set into one folder")
    return parts


class _HeaderReader(GGUFReader):
    """GGUFReader that records each tensor's header entry instead of mapping its data: the data's place is checked
    here, against the file's size, so a bad entry is an error naming its tensor rather than a numpy reshape error."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        self.entries = []
        for field in fields:
            _, name_data, _, dims, raw_type, offset = field.parts
            self.entries.append((bytes(name_data).decode("utf-8"), [int(d) for d in dims], int(raw_type[0]),
                                 start_offs + int(offset[0])))


@dataclass(frozen=True)
class GgufFile:
    """A GGUF checkpoint's header: metadata (split parts' bookkeeping removed) and every tensor by its GGUF name."""

    paths: tuple[Path, ...]
    metadata: Mapping[str, Any]
    tensors: dict[str, TensorInfo]

    @property
    def path(self) -> Path:
        return self.paths[0]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def read_gguf(path: Path) -> GgufFile:
    """Every part's header, validated; the first part's metadata."""
    parts = split_parts(path)
    metadata: dict[str, Any] = {}
    tensors: dict[str, TensorInfo] = {}
    for n, part in enumerate(parts):
        meta, infos = _read_part(part)
        if n == 0:
            metadata = meta
            _check_split_count(part, meta, len(parts))
        for info in infos:
            if info.name in tensors:
                raise CheckpointError(f"{part}: tensor {info.name!r} is also in {tensors[info.name].path.name}",
                                      CORRUPT)
            tensors[info.name] = info
    metadata = {k: v for k, v in metadata.items() if not k.startswith("split.")}
    return GgufFile(tuple(parts), metadata, tensors)


def _check_split_count(path: Path, meta: Mapping[str, Any], found: int) -> None:
    count = int(meta.get("split.count", 1))
    if count != found:
        raise CheckpointError(f"{path} says its set has {count} parts, its name says {found}",
                              "pass the first part of a complete split set (NAME-00001-of-0000N.gguf)")


def _read_part(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    if not path.is_file():  # a FIFO or a device named like a model would block or stream forever
        raise CheckpointError(f"{path} is not a regular file", "point at the model's real .gguf file")
    try:
        reader = _HeaderReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({_one_line(e)})", CORRUPT) from None
    try:
        metadata = {name: _value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}
        entries = reader.entries
    finally:
        del reader  # its memory map must not outlive the header: the disk tier drops the file's pages
    size = path.stat().st_size
    return metadata, [_tensor_info(path, size, *entry) for entry in entries]


def _value(field) -> Any:
    """A metadata field as plain Python (numbers, strings, lists of them): nothing keeps the file mapped. A float32
    number becomes the shortest decimal that is the same float32 (1e-06, not 9.999999974752427e-07: the value the
    converter was given, as a config.json written from it should say)."""
    value = field.contents()
    if field.types == [GGUFValueType.FLOAT32]:
        return float(str(np.float32(value)))
    return value


def _tensor_info(path: Path, size: int, name: str, dims: list[int], raw_type: int, start: int) -> TensorInfo:
    try:
        kind = GGMLQuantizationType(raw_type).name
    except ValueError:
        raise UnsupportedModelError(f"{path}: tensor {name!r} has ggml type id {raw_type}, unknown to offload and to "
                                    "the gguf package", "a newer llama.cpp may have written it") from None
    row = ggml_type(kind, f"{path}: tensor {name!r}")
    shape = tuple(reversed(dims))  # ggml: ne[0] is the innermost (contiguous) dimension
    if not shape or any(d <= 0 for d in shape) or shape[-1] % row.block_size:
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {list(shape)} for {kind}", CORRUPT)
    nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * row.row_nbytes(shape[-1])
    if start + nbytes > size:
        raise CheckpointError(f"{path} is truncated: tensor {name!r} ({kind}) ends at byte {start + nbytes} but the "
                              f"file has {size}", CORRUPT)
    dtype = row.dtype if row.dtype is not None else torch.float32
    return TensorInfo(name, path, dtype, shape, start, start + nbytes, kind)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__
