"""A GGUF checkpoint as the Hugging Face checkpoint it was converted from: what ``offload quantize`` writes from a
.gguf source, so a llama.cpp user's file becomes a checkpoint offload, transformers and vLLM read.

What llama.cpp's converter changed is undone (the reading side, gguf_arch.py, keeps it and compensates instead):
- ``llama`` files with experts (Mixtral) hold q and k rows (and biases) permuted for llama.cpp's rotary: they are put
  back in Hugging Face's order, and the config loses the ``rope_interleave`` the reader sets for them;
- experts stacked per layer ([E, out, in]) become one module per expert, named as the family's checkpoints name them;
- MLA's split ``attn_k_b`` / ``attn_v_b`` become kv_b_proj again (the reader's derived tensor).
Values are the file's: float types as stored, ggml blocks dequantized (float32 for experts, which the caller
quantizes; the config's dtype for resident matrices, the dtype the runtime computes them in). The tokenizer and
chat template the file embeds become tokenizer.json and tokenizer_config.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from offload.checkpoint.families import FAMILIES
from offload.checkpoint.gguf_arch import ARCHES, gguf_source
from offload.checkpoint.gguf_vocab import gguf_special_tokens, gguf_tokenizer
from offload.checkpoint.plan import CheckpointPlan
from offload.checkpoint.tensors import QuantizedTensor, TensorInfo, read_tensor
from offload.errors import UnsupportedModelError

Key = tuple[int, int]


@dataclass(frozen=True)
class HfTensor:
    """One tensor of a Hugging Face checkpoint being written: its name, the file and bytes it comes from, the expert
    it belongs to (None: resident), and how to read its values."""

    name: str
    file: Path
    nbytes: int
    expert: Key | None
    read: Callable[[], torch.Tensor]


def check_exportable(plan: CheckpointPlan) -> None:
    """Refuse a family whose Hugging Face checkpoints fuse each layer's experts (gpt-oss): one module per expert is
    what a quantized checkpoint needs."""
    if "per-expert" not in FAMILIES[plan.family.name].expert_storage:
        raise UnsupportedModelError(f"{plan.path}: {plan.family.name} checkpoints fuse each layer's experts into one "
                                    "tensor, which offload quantize does not write",
                                    "run the GGUF file as it is (offload run FILE.gguf)")


def _permuted_qk(metadata: Mapping[str, Any]) -> bool:
    return ARCHES[str(metadata.get("general.architecture"))].permuted_qk


def hf_config(path: Path) -> dict:
    """config.json of the checkpoint the GGUF file at ``path`` was converted from (q/k rows unpermuted)."""
    source = gguf_source(path)
    cfg = dict(source.cfg)
    if _permuted_qk(source.metadata):
        cfg.pop("rope_interleave", None)  # the reader's compensation for the permuted rows
    return cfg


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of llama.cpp's LlamaModel.permute: each head's rows from adjacent pairs back to two halves."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dense(plan: CheckpointPlan, name: str, info: TensorInfo | QuantizedTensor) -> Callable[[], torch.Tensor]:
    """A resident tensor's values: as stored when a float type, else in the config's dtype; q/k of a ``llama`` file
    unpermuted."""
    spec = plan.spec
    heads = {"q_proj": spec.num_heads, "k_proj": spec.num_kv_heads}
    permuted = _permuted_qk(plan.metadata)
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""

    def read() -> torch.Tensor:
        if isinstance(info, QuantizedTensor):
            parts = {suffix: read_tensor(t) for suffix, t in info.parts.items()}
            value = info.fmt.dense_weight(parts, name.removesuffix(".weight"), *info.shape).to(spec.checkpoint_dtype)
        else:
            value = read_tensor(info)
            value = value.to(spec.checkpoint_dtype) if info.blocks else value
        return _unpermute(value, heads[module]) if permuted and module in heads else value

    return read


def hf_tensors(plan: CheckpointPlan) -> Iterator[HfTensor]:
    """Every tensor the plan uses, by its Hugging Face name, resident ones first, then expert by expert (gate, up,
    down: each expert's tensors adjacent, as offload quantize writes them)."""
    for name, info in plan.dense.items():
        file = info.path if isinstance(info, TensorInfo) else next(iter(info.parts.values())).path
        yield HfTensor(name, file, info.nbytes, None, _dense(plan, name, info))
    for key, infos in plan.experts.items():
        modules = plan.family.expert_modules(*key)
        for module, info in zip(modules, infos, strict=True):
            yield HfTensor(f"{module}.weight", info.path, info.nbytes, key, partial(read_tensor, info))


def write_tokenizer(metadata: Mapping[str, Any], out: Path, max_positions: int) -> list[Path]:
    """tokenizer.json and tokenizer_config.json (special tokens, chat template) from the tokenizer a GGUF file
    embeds; nothing when it embeds none. Returns the files written."""
    tokenizer = gguf_tokenizer(metadata)
    if tokenizer is None:
        return []
    tokenizer.save(str(out / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_positions,
                              **gguf_special_tokens(metadata)}
    for key, field in (("add_bos_token", "tokenizer.ggml.add_bos_token"),
                       ("add_eos_token", "tokenizer.ggml.add_eos_token")):
        if metadata.get(field) is not None:
            config[key] = bool(metadata[field])
    if metadata.get("tokenizer.chat_template"):
        config["chat_template"] = str(metadata["tokenizer.chat_template"])
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return [out / "tokenizer.json", out / "tokenizer_config.json"]

