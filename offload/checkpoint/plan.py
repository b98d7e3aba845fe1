"""The validated plan of a checkpoint: where it is (locate.py), what its reader hands over (source.py: a Hugging
Face folder's config.json and safetensors, or a GGUF file's metadata and tensors, gguf_arch.py), its config read by
its family's adapter (families.py), the experts' format (experts/formats/) and storage (storage.py), each expected
tensor checked for shape and dtype: a :class:`CheckpointPlan`, made before any weight is loaded. A config.json alone
gives a :class:`ConfigPlan` (sizes estimated), for `offload info`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from offload.checkpoint.families import Family, family_for_config
from offload.checkpoint.gguf import is_gguf
from offload.checkpoint.gguf_arch import gguf_source
from offload.checkpoint.locate import language_config, quantization_config, read_config, resolve_model_dir
from offload.checkpoint.source import Check, Source, folder_source
from offload.checkpoint.storage import ExpertStorage, first_tensor, storage_of, stored_nbytes
from offload.checkpoint.tensors import FLOAT_DTYPES, QuantizedTensor, TensorInfo, check_tensor, read_runs
from offload.errors import CheckpointError
from offload.experts.formats.base import ExpertFormat
from offload.experts.formats.dense import DenseFormat
from offload.experts.formats.registry import format_from_config
from offload.experts.layouts import ExpertLayout, Part, projection_shapes
from offload.spec import DTYPES, ModelSpec

log = logging.getLogger(__name__)


# -- the validated plan -------------------------------------------------------------------------------

ExpertTensors = tuple[TensorInfo, ...]  # gate's, up's, down's tensors, in the expert format's order


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
    storage: ExpertStorage  # how the files lay the experts out (one module each, or fused per layer)
    metadata: Mapping[str, Any] = field(default_factory=dict)  # what the file embeds besides (GGUF: tokenizer, ...)

    @property
    def dense_numel(self) -> int:
        """Elements of every resident tensor (what the compute dtype multiplies into bytes)."""
        return sum(math.prod(t.shape) for t in self.dense.values())

    @property
    def dense_nbytes(self) -> int:
        return sum(t.nbytes for t in self.dense.values())

    def expert_nbytes(self, dtype: torch.dtype | None = None) -> int:
        """One expert's bytes as stored (the mean, where layers store experts in different types), or in ``dtype``
        (a float format cast on load)."""
        if dtype is not None:
            return self.spec.expert_params * dtype.itemsize
        return round(sum(t.nbytes for infos in self.experts.values() for t in infos) / len(self.experts))

    def reads_per_expert(self) -> float:
        """Read requests a disk-tier miss issues (the mean over experts): 1 where an expert's tensors lie together,
        one per tensor where a file stacks each tensor over the experts (GGUF)."""
        return sum(len(read_runs(infos)) for infos in self.experts.values()) / len(self.experts)

    def stored_types(self) -> dict[str, str]:
        """How each group of resident tensors is stored ("attention": "Q8_0", "norms": "F32", ...): a GGUF file's
        ggml types, a safetensors checkpoint's dtypes (a group of several lists each with its count)."""
        groups: dict[str, Counter] = {}
        shapes = {**{n: "embeddings" for n in ("model.embed_tokens.weight",)}, "lm_head.weight": "output",
                  "model.norm.weight": "norms"}
        for layer in range(self.spec.num_layers):
            for piece, names in self.family.layer_tensors(self.spec, layer).items():
                shapes |= dict.fromkeys(names, "norms" if piece.endswith("norm") else piece.replace("_", " "))
        for name, info in self.dense.items():
            parts = info.parts.values() if isinstance(info, QuantizedTensor) else (info,)
            for part in parts:
                groups.setdefault(shapes.get(name, "other"), Counter())[_stored_type(part)] += 1
        return {group: ", ".join(kind if len(c) == 1 else f"{kind} x{n}" for kind, n in c.most_common())
                for group, c in groups.items()}

    def source_layout(self, key: tuple[int, int], parts: Sequence[Part]) -> ExpertLayout:
        """Expert ``key``'s layout in the checkpoint's format from the places of its tensors in a buffer."""
        return self.storage.source_layout(self.spec, self.expert_format.layer_format(key[0]), parts)

    def host_layout(self, dtype: torch.dtype, device: torch.device, activations: str) -> Callable:
        """key -> the layout the RAM tier holds that expert in (its layer's format's host layout)."""
        fmt, spec = self.expert_format, self.spec
        layouts = {layer: fmt.layer_format(layer).host_layout(spec, dtype, device, activations)
                   for layer in {key[0] for key in self.experts}}
        return lambda key: layouts[key[0]]


def _stored_type(info: TensorInfo) -> str:
    return info.encoding or str(info.dtype).removeprefix("torch.")


def _checkpoint_dtype(cfg: dict, tensors: dict[str, TensorInfo]) -> torch.dtype:
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if isinstance(name, str) and name.lower() in DTYPES:
        return DTYPES[name.lower()]
    return next(t.dtype for t in tensors.values() if t.dtype in FLOAT_DTYPES)


def check_layer_count(cfg: dict, tensors: Mapping[str, TensorInfo], config: str) -> None:
    """config.json's num_hidden_layers against the layers the weights hold, before anything is built per layer
    (a 24-byte edit to 10,000,000 layers would otherwise cost gigabytes before the first missing tensor is seen).
    The weights may hold more (DeepSeek's multi-token-prediction layers), never fewer."""
    layers = cfg.get("num_hidden_layers")
    if not isinstance(layers, int) or isinstance(layers, bool):
        return  # absent or mis-typed: the family's reader names the field
    held = {int(m.group(1)) for name in tensors if (m := _LAYER.search(name))}
    if layers > len(held):
        raise CheckpointError(f"{config}: num_hidden_layers={layers} but the weights hold {len(held)} layers",
                              "the config does not match the weights: fix or re-download config.json")


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _read_spec(source: Source) -> ModelSpec:
    config, family, cfg = source.config_name, source.family, source.cfg
    check_layer_count(cfg, source.tensors, config)
    try:
        return family.spec_from_config(cfg, _checkpoint_dtype(cfg, source.tensors))
    except (KeyError, TypeError, ValueError, StopIteration) as e:
        raise CheckpointError(f"{config} lacks or mis-types a field ({e})",
                              "fix or re-download config.json") from None
    except CheckpointError as e:  # ModelSpec's own checks name the field; say which file it is in
        raise CheckpointError(e.message.replace("config.json", str(config), 1), e.hint) from None


# How each kind of checkpoint path is read: a .gguf file (or the first part of a split set), else a folder.
READERS: dict[str, Callable[[Path], Source]] = {"gguf": gguf_source, "folder": folder_source}


def read_source(path: Path) -> Source:
    return READERS["gguf" if is_gguf(path) else "folder"](path)


def plan_checkpoint(name_or_path: str | os.PathLike) -> CheckpointPlan:
    """Resolve, read and validate a checkpoint: every header, every expected tensor's shape, experts included."""
    source = read_source(resolve_model_dir(name_or_path))
    path, family, tensors = source.path, source.family, source.tensors
    spec = _read_spec(source)
    storage = storage_of(family, spec, tensors)
    fmt = source.expert_format or expert_format(family, spec, storage, tensors, source.quantization_config, path)
    dense = {name: source.derived.get(name) or _dense_tensor(tensors, name, shape, fmt, source.check)
             for name, shape in family.dense_tensors(spec).items()}
    experts = {(layer, e): storage.tensors(family, spec, fmt, tensors, source.check, layer, e)
               for layer in (n for n, moe in enumerate(spec.moe_layers) if moe) for e in range(spec.num_experts)}
    _note_skipped_layers(tensors, spec, path)
    plan = CheckpointPlan(path, spec, family, dict(tensors), dense, experts, fmt, storage, source.metadata)
    _check_first_expert(plan)
    return plan


def expert_format(family: Family, spec: ModelSpec, storage: ExpertStorage, tensors: Mapping[str, TensorInfo],
                  qc: dict | None, path: Path) -> ExpertFormat:
    """The format the checkpoint stores its experts in: float (the first expert's weight dtype) or the
    quantization_config's (experts/formats/registry.py; anything else is refused by name)."""
    probe = storage.probe(family, spec)
    if probe in tensors and tensors[probe].dtype in FLOAT_DTYPES:
        return DenseFormat(tensors[probe].dtype)  # float experts (whatever else the config quantizes)
    if qc is None:
        check_tensor(tensors, probe, ())  # raises: names the missing or non-float tensor
    fmt = format_from_config(qc, str(path / "config.json"))
    first = first_tensor(storage, family, spec, fmt)
    if first not in tensors:
        raise CheckpointError(f"tensor {first!r} is missing from the checkpoint ({fmt.name} experts)",
                              "the tensors do not match config.json's quantization_config")
    return fmt


def _note_skipped_layers(tensors: dict[str, TensorInfo], spec: ModelSpec, path: Path) -> None:
    """Multi-token-prediction layers (index num_hidden_layers and up, DeepSeek / GLM) are not run: one line."""
    extra = {int(m.group(1)) for name in tensors if (m := re.match(r"model\.layers\.(\d+)\.", name))
             and int(m.group(1)) >= spec.num_layers}
    if extra:
        log.info("%s: skipping layer(s) %s (multi-token prediction, not used for generation)", path,
                 ", ".join(map(str, sorted(extra))))


def _dense_tensor(tensors: Mapping[str, TensorInfo], name: str, shape: tuple[int, ...],
                  fmt: ExpertFormat, check: Check = check_tensor) -> TensorInfo | QuantizedTensor:
    """A resident tensor, or, where the format stores this projection quantized, its parts."""
    stored = fmt.dense_parts(tensors, name, shape)
    if stored is None:
        return check(tensors, name, shape)
    parts = {suffix: check(tensors, part, part_shape, dtypes) for suffix, (part, part_shape, dtypes)
             in stored.items()}
    return QuantizedTensor(name, parts, fmt, shape)  # type: ignore[arg-type]


def _check_first_expert(plan: CheckpointPlan) -> None:
    """Let the format check the first expert's projections once (integer formats unpack them: act-order g_idx and
    inconsistent values fail here, by name); formats whose values cannot be inconsistent read nothing here."""
    fmt, infos = plan.expert_format, next(iter(plan.experts.values()))
    if not fmt.checks_values:
        return
    n = len(fmt.tensor_suffixes())
    for i, (out, inn) in enumerate(projection_shapes(plan.spec)):
        group = infos[i * n:(i + 1) * n]
        with safe_open(str(group[0].path), framework="pt") as f:
            loaded = {info.name.rsplit(".", 1)[1]: f.get_tensor(info.name) for info in group}
        fmt.check_expert(loaded, group[0].name.rsplit(".", 1)[0], out, inn)


# -- a config.json alone (offload info on a released config, before downloading gigabytes) ----------------------


@dataclass(frozen=True)
class ConfigPlan:
    """What config.json alone says: the spec, the expert format and the bytes it implies (estimated: no headers)."""

    path: Path
    spec: ModelSpec
    family: Family
    expert_format: ExpertFormat
    expert_nbytes: int   # one expert as stored
    dense_numel: int     # elements of the resident tensors

    @property
    def dense_nbytes(self) -> int:
        """Resident tensors at the checkpoint's float dtype."""
        return self.dense_numel * self.spec.checkpoint_dtype.itemsize


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
    fmt = format_from_config(qc, str(config)) if qc is not None else DenseFormat(spec.checkpoint_dtype)
    dense = sum(math.prod(shape) for shape in family.dense_tensors(spec).values())
    return ConfigPlan(path, spec, family, fmt, stored_nbytes(family, spec, fmt), dense)
