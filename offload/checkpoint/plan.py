"""Reads a checkpoint in Hugging Face layout: resolves where it is, parses config.json and every
safetensors header, and checks that each expected tensor exists with the expected shape, giving a
validated :class:`CheckpointPlan` before any weight is loaded.

Headers are parsed here (they are a documented 8-byte length + JSON) because the disk tier needs
each tensor's absolute byte offset to read experts on demand; dense tensors are loaded with
``safetensors.safe_open`` (memory-mapped, never pickle).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from offload.checkpoint.families import Family, family_for_config
from offload.checkpoint.storage import projection_shapes, storage_of
from offload.errors import CheckpointError, ConfigError, UnsupportedModelError
from offload.experts import quant
from offload.experts.formats.quantized import Fp8BlockFormat, Mxfp4Format, QuantFormat
from offload.experts.layouts import DenseFormat, ExpertFormat, ExpertLayout, Part
from offload.spec import DTYPES, ModelSpec

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).parents[1] / "bundled"
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    # integer tensors hold quantized weights (GPTQ qweight/qzeros/g_idx, compressed-tensors weight_packed/shape)
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F8_E4M3": torch.float8_e4m3fn,  # DeepSeek-V3's FP8 weights (with block scales)
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_HEADER = 100 * 2**20


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


def bundled_models() -> list[str]:
    """Names of the models shipped inside the package."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file())


def _looks_like_repo_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A bundled model name, a local directory, or a hub repo id (through huggingface_hub's cache)."""
    text = str(name_or_path)
    if text in bundled_models():
        return BUNDLED_DIR / text
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file, not a checkpoint directory",
                                  "pass the folder that holds config.json and *.safetensors")
        return path
    if _looks_like_repo_id(text) and not path.parent.exists():
        return _download(text)
    hint = "give a checkpoint directory, a hub repo id (org/name)"
    if bundled_models():
        hint += f" or a bundled model ({', '.join(bundled_models())})"
    raise CheckpointError(f"no such model directory: {path}", hint)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download  # imported lazily: only needed for hub ids

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "additional_chat_templates/*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as online_error:  # noqa: BLE001 - any hub failure ends in the same user-facing error
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:  # noqa: BLE001
            raise CheckpointError(
                f"cannot fetch {repo_id!r} from the Hugging Face hub and it is not in the local cache "
                f"({type(online_error).__name__})",
                "check the repo id and your network, or download it once with `huggingface-cli download`",
            ) from None


def read_config(model_dir: Path) -> dict:
    """config.json as a dict; a clear error when it is missing or not JSON."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {model_dir}", "a Hugging Face checkpoint folder needs config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})", "re-download the checkpoint") from None


def read_json_if_present(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})", "re-download the checkpoint") from None


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


# -- the validated plan -------------------------------------------------------------------------------

ExpertTensors = tuple[TensorInfo, ...]  # gate's, up's, down's tensors, in the expert format's order


@dataclass(frozen=True)
class QuantizedTensor:
    """A resident projection stored quantized (GPTQ checkpoints quantize attention too, DeepSeek's FP8
    quantizes every projection): dequantized to float once, at load, by its format's ``dense_weight``."""

    name: str                      # the ``.weight`` it stands for
    parts: dict[str, TensorInfo]   # by suffix (qweight, qzeros, ... / weight, weight_scale_inv)
    fmt: ExpertFormat
    shape: tuple[int, int]         # (out, in)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts.values())


@dataclass(frozen=True)
class CheckpointPlan:
    """A checkpoint read and validated, before any weight is loaded."""

    path: Path
    spec: ModelSpec
    family: Family
    tensors: dict[str, TensorInfo]
    dense: dict[str, TensorInfo | QuantizedTensor]  # every resident tensor, by name
    experts: dict[tuple[int, int], ExpertTensors]
    expert_format: ExpertFormat

    @property
    def dense_nbytes(self) -> int:
        return sum(t.nbytes for t in self.dense.values())

    def expert_nbytes(self, dtype: torch.dtype | None = None) -> int:
        """One expert's bytes as stored, or in ``dtype`` (a float format cast on load)."""
        if dtype is not None:
            return self.spec.expert_params * dtype.itemsize
        return sum(t.nbytes for t in next(iter(self.experts.values())))

    def source_layout(self, parts: Sequence[Part]) -> ExpertLayout:
        """An expert's layout in the checkpoint's format from the places of its tensors in a buffer."""
        return storage_of(self.family).source_layout(self.spec, self.expert_format, parts)


def _checkpoint_dtype(cfg: dict, tensors: dict[str, TensorInfo]) -> torch.dtype:
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if isinstance(name, str) and name.lower() in DTYPES:
        return DTYPES[name.lower()]
    return next(t.dtype for t in tensors.values() if t.dtype in FLOAT_DTYPES)


def _read_spec(path: Path, family: Family, cfg: dict, tensors: dict[str, TensorInfo]) -> ModelSpec:
    config = path / "config.json"
    try:
        return family.spec_from_config(cfg, _checkpoint_dtype(cfg, tensors))
    except (KeyError, TypeError, ValueError, StopIteration) as e:
        raise CheckpointError(f"{config} lacks or mis-types a field ({e})",
                              "fix or re-download config.json") from None
    except CheckpointError as e:  # ModelSpec's own checks name the field; say which file it is in
        raise CheckpointError(e.message.replace("config.json", str(config), 1), e.hint) from None


def language_config(cfg: dict) -> dict:
    """The language model's config: the top level, or a multimodal wrapper's ``text_config`` (Kimi-K2.6)."""
    text = cfg.get("text_config")
    if not isinstance(text, dict) or not (text.get("architectures") or text.get("model_type")):
        return cfg
    try:
        family_for_config(cfg)
        return cfg
    except UnsupportedModelError:
        qc = quantization_config(cfg)
        return {**text, **({"quantization_config": qc} if qc else {})}


def quantization_config(cfg: dict) -> dict | None:
    """config.json's quantization_config, at the top level or nested in text_config (Kimi-K2.6)."""
    qc = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    return qc if isinstance(qc, dict) else None


def plan_checkpoint(name_or_path: str | os.PathLike) -> CheckpointPlan:
    """Resolve, read and validate a checkpoint: every header, every expected tensor's shape, experts included."""
    path = resolve_model_dir(name_or_path)
    cfg = language_config(read_config(path))
    family = family_for_config(cfg)
    tensors = index_tensors(path)
    spec = _read_spec(path, family, cfg, tensors)
    fmt = expert_format(family, spec, tensors, quantization_config(cfg), path)
    dense = {name: _dense_tensor(tensors, name, shape, fmt) for name, shape in family.dense_tensors(spec).items()}
    storage = storage_of(family)
    experts = {(layer, e): storage.tensors(family, spec, fmt, tensors, check_tensor, layer, e)
               for layer in (n for n, moe in enumerate(spec.moe_layers) if moe) for e in range(spec.num_experts)}
    _note_skipped_layers(tensors, spec, path)
    plan = CheckpointPlan(path, spec, family, tensors, dense, experts, fmt)
    if isinstance(fmt, QuantFormat):
        _check_first_expert(plan)
    return plan


def expert_format(family: Family, spec: ModelSpec, tensors: dict[str, TensorInfo], qc: dict | None,
                  path: Path) -> ExpertFormat:
    """The format the checkpoint stores its experts in: float (the first expert's weight dtype) or the
    quantization_config's (GPTQ, compressed-tensors pack-quantized; anything else is refused by name)."""
    probe = storage_of(family).probe(family, spec)
    if probe in tensors and tensors[probe].dtype in FLOAT_DTYPES:
        return DenseFormat(tensors[probe].dtype)  # float experts (whatever else the config quantizes)
    fmt = _quantized_format(qc, path) if qc is not None else None
    if fmt is None:
        check_tensor(tensors, probe, ())  # raises: names the missing or non-float tensor
    if isinstance(fmt, QuantFormat):
        first = f"{probe.removesuffix('.weight')}.{fmt.tensor_suffixes()[0]}"
        if first not in tensors:
            raise CheckpointError(f"tensor {first!r} is missing from the checkpoint ({fmt.name} experts)",
                                  "the tensors do not match config.json's quantization_config")
    return fmt  # type: ignore[return-value]


def _quantized_format(qc: dict, path: Path) -> ExpertFormat:
    """The format a quantization_config names; anything offload cannot read is refused by name."""
    method = str(qc.get("quant_method", "")).lower()
    if method == "mxfp4":
        return Mxfp4Format()
    if method == "fp8":
        block = qc.get("weight_block_size") or [128, 128]
        if qc.get("fmt", "e4m3") != "e4m3" or len(block) != 2:
            raise UnsupportedModelError(f"{path / 'config.json'}: fp8 {qc.get('fmt')} with blocks {block}",
                                        "offload reads e4m3 FP8 with 2-D weight_block_size")
        return Fp8BlockFormat((int(block[0]), int(block[1])))
    try:
        return QuantFormat(*quant.scheme_from_config(qc))
    except (UnsupportedModelError, ConfigError) as e:
        raise UnsupportedModelError(f"{path / 'config.json'}: {e.message}", e.hint) from None


def _note_skipped_layers(tensors: dict[str, TensorInfo], spec: ModelSpec, path: Path) -> None:
    """Multi-token-prediction layers (index num_hidden_layers and up, DeepSeek / GLM) are not run: one line."""
    extra = {int(m.group(1)) for name in tensors if (m := re.match(r"model\.layers\.(\d+)\.", name))
             and int(m.group(1)) >= spec.num_layers}
    if extra:
        log.info("%s: skipping layer(s) %s (multi-token prediction, not used for generation)", path,
                 ", ".join(map(str, sorted(extra))))


def _dense_tensor(tensors: dict[str, TensorInfo], name: str, shape: tuple[int, ...],
                  fmt: ExpertFormat) -> TensorInfo | QuantizedTensor:
    """A resident tensor, or, where the format stores this projection quantized, its parts."""
    stored = fmt.dense_parts(tensors, name, shape)
    if stored is None:
        return check_tensor(tensors, name, shape)
    parts = {suffix: check_tensor(tensors, part, part_shape, dtypes) for suffix, (part, part_shape, dtypes)
             in stored.items()}
    return QuantizedTensor(name, parts, fmt, shape)  # type: ignore[arg-type]


def _check_first_expert(plan: CheckpointPlan) -> None:
    """Unpack the first expert's projections once: act-order g_idx and inconsistent values fail here, by name."""
    from safetensors import safe_open

    fmt, infos = plan.expert_format, next(iter(plan.experts.values()))
    n = len(fmt.tensor_suffixes())
    for i, (out, inn) in enumerate(projection_shapes(plan.spec)):
        group = infos[i * n:(i + 1) * n]
        with safe_open(str(group[0].path), framework="pt") as f:
            loaded = {info.name.rsplit(".", 1)[1]: f.get_tensor(info.name) for info in group}
        fmt.unpack(loaded, group[0].name.rsplit(".", 1)[0], out, inn)  # type: ignore[attr-defined]


# -- a config.json alone (offload info on a released config, before downloading gigabytes) ----------------------


@dataclass(frozen=True)
class ConfigPlan:
    """What config.json alone says: the spec, the expert format and the bytes it implies (estimated: no headers)."""

    path: Path
    spec: ModelSpec
    family: Family
    expert_format: ExpertFormat
    expert_nbytes: int   # one expert as stored
    dense_nbytes: int    # resident tensors, at the checkpoint's float dtype


def _stored_nbytes(fmt: ExpertFormat, spec: ModelSpec) -> int:
    """One expert's bytes in ``fmt``: every stored tensor's elements times its dtype's size."""
    total = 0
    for out, inn in projection_shapes(spec):
        if isinstance(fmt, Mxfp4Format):  # 16 bytes + 1 scale per 32 weights, and a bias
            total += out * inn * 17 // 32 + out * spec.checkpoint_dtype.itemsize
            continue
        dtypes = {"weight": (spec.checkpoint_dtype,)} if isinstance(fmt, DenseFormat) else {}
        for suffix, shape in fmt.shapes(out, inn).items():
            dtype = dtypes.get(suffix, fmt.dtypes(suffix))[0]
            n = dtype.itemsize
            for d in shape:
                n *= d
            total += n
        if spec.expert_bias:
            total += out * spec.checkpoint_dtype.itemsize
    return total


def plan_config(name_or_path: str | os.PathLike) -> ConfigPlan:
    """Read and check config.json only (no safetensors needed): for budgets and sizes at real scale."""
    path = resolve_model_dir(name_or_path)
    cfg = language_config(read_config(path))
    family = family_for_config(cfg)
    config = path / "config.json"
    try:
        spec = family.spec_from_config(cfg, DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or
                                                           "bfloat16").lower(), torch.bfloat16))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config} lacks or mis-types a field ({e})", "fix or re-download config.json") from None
    qc = quantization_config(cfg)
    fmt = _quantized_format(qc, path) if qc is not None else DenseFormat(spec.checkpoint_dtype)
    dense = sum(math.prod(shape) for shape in family.dense_tensors(spec).values()) * spec.checkpoint_dtype.itemsize
    return ConfigPlan(path, spec, family, fmt, _stored_nbytes(fmt, spec), dense)
