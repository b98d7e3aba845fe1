"""A checkpoint as its reader hands it to the plan: a config in config.json's spellings, tensors by the names the
family adapter and the expert storage ask for, and what the files say themselves (a GGUF file names its experts' ggml
types and embeds its tokenizer and chat template). One Source per file format; the plan (plan.py) is the same for
all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offload.checkpoint.families import Family, family_for_config
from offload.checkpoint.locate import language_config, quantization_config, read_config
from offload.checkpoint.safetensors import index_tensors, language_model_tensors
from offload.checkpoint.tensors import QuantizedTensor, TensorInfo, check_tensor
from offload.experts.formats.base import ExpertFormat

Check = Callable[..., TensorInfo]  # check_tensor's signature: the tensor's info, or an error naming it as the file does


@dataclass(frozen=True)
class Source:
    """What the plan needs of a checkpoint, whatever its files."""

    path: Path                              # the checkpoint folder, or the (first) .gguf file
    cfg: dict                               # config.json's fields (GGUF: its metadata in config.json's spellings)
    config_name: str                        # where ``cfg`` came from, named in errors
    family: Family
    tensors: Mapping[str, TensorInfo]       # by the names the family adapter and the expert storage ask for
    check: Check = check_tensor
    expert_format: ExpertFormat | None = None  # said by the files (GGUF); None: from quantization_config / dtype
    quantization_config: dict | None = None
    derived: Mapping[str, QuantizedTensor] = field(default_factory=dict)  # resident tensors made of others
    metadata: Mapping[str, Any] = field(default_factory=dict)  # GGUF key/values: tokenizer, chat template, ...


def folder_source(path: Path) -> Source:
    """A Hugging Face checkpoint folder: config.json (or a multimodal wrapper's text_config) and safetensors."""
    cfg = language_config(read_config(path))
    tensors = language_model_tensors(index_tensors(path))
    return Source(path, cfg, str(path / "config.json"), family_for_config(cfg), tensors,
                  quantization_config=quantization_config(cfg))
