"""``offload quantize``: a float checkpoint (or a GGUF file) -> a new Hugging Face checkpoint whose experts are
quantized.

The output is compressed-tensors ``pack-quantized`` (what llm-compressor writes and vLLM, transformers +
compressed-tensors and offload all load; Kimi-K2's native int4 is the same format): it stores the plain
nibble packing, the bytes offload's CPU kernels compute from (a miss copies them into the slot; GPTQ's
transposed words would add a word transpose). Each expert's tensors are written back to back (any data
order is valid safetensors), so a disk-tier miss is one read. Only routed experts are quantized;
attention, routers, shared experts, dense MLPs, norms, embeddings and lm_head are copied as they are,
and the config's ``quantization_config`` targets the expert modules only.

The checkpoint is written to a fresh ``DIR.partial-<pid>-<random>`` and renamed when complete; ``MODEL`` is only
read (the bundled models live inside the installed package), a non-empty ``DIR`` is refused. Every other file of
the source (tokenizer, generation and chat config, a shipped predictor.safetensors, ...) is copied, and each
file keeps its source's permission bits.

A GGUF source is written as the Hugging Face checkpoint it was converted from (checkpoint/gguf_hf.py: config.json,
names, q/k rows and kv_b as transformers has them, tokenizer.json and the chat template), its experts dequantized
and quantized again: from F16 / BF16 / F32 files that is one rounding, as from safetensors; from a quantized file a
second one on top of llama.cpp's (a user's choice: the file also runs as it is).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from offload.checkpoint import gguf_hf
from offload.checkpoint.gguf import is_gguf
from offload.checkpoint.gguf_hf import HfTensor
from offload.checkpoint.plan import CheckpointPlan, plan_checkpoint
from offload.checkpoint.safetensors import write_safetensors
from offload.checkpoint.tensors import TensorInfo
from offload.errors import ConfigError, OutputError
from offload.experts import quant
from offload.experts.formats.compressed_tensors import compressed_tensors_config, compressed_tensors_pack
from offload.experts.quant import QuantScheme
from offload.files import atomic_output

SHARD_BYTES = 2 * 2**30  # output shards of about this size, as save_pretrained's default 5 GB is too coarse to stream
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class QuantizeReport:
    out: Path
    scheme: QuantScheme
    experts: int
    bytes_before: int  # the experts' bytes in the source checkpoint
    bytes_after: int   # ... and in the quantized one


def _check_paths(plan: CheckpointPlan, out: Path) -> Path:
    out = out.expanduser().resolve()
    src = plan.path.resolve()
    if out == src or src in out.parents:
        raise ConfigError(f"--out {out} is inside the source checkpoint {src}", "write the quantized model elsewhere")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty directory", "give a new output directory")
    return out


def _check_scheme(plan: CheckpointPlan, scheme: QuantScheme) -> None:
    if is_gguf(plan.path):
        gguf_hf.check_exportable(plan)  # any ggml type: its experts are dequantized first
    elif plan.expert_format.float_dtype is None:
        raise ConfigError(f"{plan.path} is already quantized ({plan.expert_format.name})",
                          "quantize a float checkpoint")
    elif plan.storage.fused:  # compressed-tensors quantizes Linear modules: one per expert projection
        raise ConfigError(f"{plan.path} fuses each layer's experts into one tensor ({plan.storage.name})",
                          "quantize a checkpoint with one module per expert (as transformers' save_pretrained writes)")
    for dim in {plan.spec.hidden_size, plan.spec.expert_intermediate_size}:
        scheme.groups(dim)  # raises when the group size does not divide an expert matrix's inputs


def _expert_targets(plan: CheckpointPlan) -> list[str]:
    """compressed-tensors targets naming exactly the routed experts' projections."""
    names = "|".join(plan.family.expert_names)
    return [rf"re:.*\.{plan.family.moe_prefix}\.experts\.\d+\.({names})$"]


def _write_config(plan: CheckpointPlan, tmp: Path, scheme: QuantScheme) -> None:
    gguf = is_gguf(plan.path)
    cfg = gguf_hf.hf_config(plan.path) if gguf else json.loads((plan.path / "config.json").read_text())
    cfg["quantization_config"] = compressed_tensors_config(scheme, ["lm_head"], tuple(_expert_targets(plan)))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if gguf:
        tokenizer = gguf_hf.write_tokenizer(plan.metadata, tmp, plan.spec.max_position_embeddings)
        for written in (tmp / "config.json", *tokenizer):
            _same_mode(plan.path, written)
        return
    _same_mode(plan.path / "config.json", tmp / "config.json")
    weights = {t.path for t in plan.tensors.values()}
    for path in plan.path.iterdir():  # tokenizer, generation and chat config, a shipped predictor, ...
        if path.name == "config.json" or path in weights or path.name.endswith(".index.json"):
            continue
        if path.is_file():
            shutil.copy2(path, tmp / path.name)  # content, permission bits and times
        elif path.is_dir():
            shutil.copytree(path, tmp / path.name)  # additional_chat_templates/


def _same_mode(source: Path, written: Path) -> None:
    """A written file gets its source's permission bits (not the writer's: safetensors' own are 0600)."""
    written.chmod(stat.S_IMODE(source.stat().st_mode))


def _save(groups: list[dict[str, torch.Tensor]], path: Path, like: Path) -> None:
    """One output shard, each expert's tensors back to back (a disk-tier miss is one read); a failed write (disk
    full, a file size limit) is one error naming the file."""
    try:
        write_safetensors(groups, path, {"format": "pt"})
    except OSError as e:
        raise OutputError(f"cannot write {path.name} of the quantized checkpoint ({e.strerror or e})",
                          "free disk space (nothing was written to the output folder)") from None
    _same_mode(like, path)


def _tensors(plan: CheckpointPlan) -> list[HfTensor]:
    """What the output holds, in the order it is written: a safetensors source's tensors in file order (each
    expert's read through safetensors), a GGUF source's as the Hugging Face checkpoint it came from."""
    if is_gguf(plan.path):
        return list(gguf_hf.hf_tensors(plan))
    expert_of = {info.name: key for key, tensors in plan.experts.items() for info in tensors}
    read = _Reader()
    return [HfTensor(info.name, info.path, info.nbytes, expert_of.get(info.name), lambda info=info: read(info))
            for info in sorted(plan.tensors.values(), key=lambda t: (str(t.path), t.start))]


def _shards(tensors: list[HfTensor]) -> list[list[HfTensor]]:
    """The tensors cut into shards of about SHARD_BYTES of source bytes (quantized experts shrink them), never inside
    an expert (its tensors stay in one file, back to back)."""
    shards: list[list[HfTensor]] = [[]]
    size = 0
    for t in tensors:
        if size >= SHARD_BYTES and (t.expert is None or t.expert != shards[-1][-1].expert):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


class _Reader:
    """Source tensors through safetensors, one open handle per file."""

    def __init__(self) -> None:
        self._handles: dict[Path, object] = {}

    def __call__(self, info: TensorInfo) -> torch.Tensor:
        if info.path not in self._handles:
            self._handles[info.path] = safe_open(str(info.path), framework="pt")
        return self._handles[info.path].get_tensor(info.name)  # type: ignore[attr-defined]


def _quantized_shard(shard: list[HfTensor], scheme: QuantScheme, clip_search: bool,
                     tick: Callable[[int, int], None]) -> list[dict[str, torch.Tensor]]:
    """One output shard as groups: an expert's projections quantized and packed together, every other tensor as it
    was, alone."""
    groups: dict[object, dict[str, torch.Tensor]] = {}
    for t in shard:
        w = t.read()
        if t.expert is None:
            groups[t.name] = {t.name: w}
            continue
        q = quant.quantize(w, scheme, scale_dtype=torch.bfloat16, clip_search=clip_search)
        packed = compressed_tensors_pack(q)
        groups.setdefault(t.expert, {}).update({f"{t.name.removesuffix('.weight')}.{k}": v for k, v in packed.items()})
        tick(t.nbytes, sum(v.numel() * v.itemsize for v in packed.values()))
    return list(groups.values())


def quantize_checkpoint(model: str | os.PathLike, out: str | os.PathLike, scheme: QuantScheme,
                        clip_search: bool = False, progress: Progress | None = None) -> QuantizeReport:
    """Quantize ``model``'s routed experts with ``scheme`` (round to nearest, or with a clipping search) into ``out``.

    ``progress(done, total)`` counts expert matrices.
    """
    plan = plan_checkpoint(model)
    out = _check_paths(plan, Path(out))
    _check_scheme(plan, scheme)
    tensors = _tensors(plan)
    matrices = sum(t.expert is not None for t in tensors)
    shards, weight_map = _shards(tensors), {}
    counts = [0, 0, 0]  # matrices done, bytes before, bytes after

    def tick(before: int, after: int) -> None:
        counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + before, counts[2] + after
        if progress:
            progress(counts[0], matrices)

    with atomic_output(out, directory=True) as tmp:
        _write_config(plan, tmp, scheme)
        for n, shard in enumerate(shards):
            name = "model.safetensors" if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            groups = _quantized_shard(shard, scheme, clip_search, tick)
            _save(groups, tmp / name, shard[0].file)
            weight_map |= {tensor: name for group in groups for tensor in group}
        if len(shards) > 1:
            total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            _same_mode(shard[0].file, tmp / "model.safetensors.index.json")
    return QuantizeReport(out, scheme, len(plan.experts), counts[1], counts[2])
