"""Every bad input ends in a typed error naming the file, tensor or option, and never touches the user's files."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

import offload
from offload.errors import BudgetError, CheckpointError, UnsupportedModelError


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def broken(tiny_dir, tmp_path):
    """A private copy of a tiny Mixtral to damage; the test checks it is unchanged after the error."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_dir("mixtral"), dst)
    return dst


def header_of(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def rewrite_header(path: Path, header: dict) -> None:
    n, _ = header_of(path)
    data = path.read_bytes()[8 + n :]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def expect(error_type, match: str, path, **kwargs):
    before = digest(path) if Path(path).is_dir() else None
    with pytest.raises(error_type, match=match) as info:
        offload.from_pretrained(path, device="cpu", **kwargs)
    assert "\n" not in str(info.value)
    if before is not None:
        assert digest(path) == before  # the user's files are untouched
    return info.value


def test_missing_path(tmp_path):
    expect(CheckpointError, "no such model directory", tmp_path / "nope")


def test_no_config(broken):
    (broken / "config.json").unlink()
    expect(CheckpointError, "no config.json", broken)


def test_dense_architecture_lists_supported(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    del cfg["num_local_experts"]
    (broken / "config.json").write_text(json.dumps(cfg))
    err = expect(UnsupportedModelError, "LlamaForCausalLM is a dense or unsupported architecture", broken)
    assert "MixtralForCausalLM" in err.hint and "OlmoeForCausalLM" in err.hint


def test_truncated_safetensors(broken):
    path = broken / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    expect(CheckpointError, "model.safetensors is truncated", broken)


def test_corrupt_header(broken):
    path = broken / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[10:20] = b"\xff" * 10
    path.write_bytes(bytes(raw))
    expect(CheckpointError, "corrupt safetensors header", broken)


def test_wrong_shape_of_an_expert_never_routed_to(broken):
    """Validation is up front: a mis-shaped expert fails at load even if no token would reach it."""
    path = broken / "model.safetensors"
    _, header = header_of(path)
    name = "model.layers.2.block_sparse_moe.experts.3.w2.weight"
    h, i = header[name]["shape"]
    header[name]["shape"] = [i, h]
    rewrite_header(path, header)
    expect(CheckpointError, f"tensor '{name}'.*has shape \\[{i}, {h}\\], expected \\[{h}, {i}\\]", broken)


def test_missing_tensor(broken):
    path = broken / "model.safetensors"
    _, header = header_of(path)
    name = "model.layers.1.self_attn.k_proj.weight"
    header[f"renamed.{name}"] = header.pop(name)
    rewrite_header(path, header)
    expect(CheckpointError, f"tensor '{name}' is missing", broken)


def test_missing_shard(tiny_dir, tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(tiny_dir("mixtral", sharded=True), dst)
    victim = sorted(dst.glob("*.safetensors"))[-1]
    victim.unlink()
    expect(CheckpointError, f"shard .*{victim.name}.* is missing", dst)


@pytest.mark.parametrize("budget, match", [(0, "at least 1 slot"), (-3, "at least 1 slot"), ("0%", "must be positive"),
                                           ("150%", "over 100%"), ("lots", "cannot parse"),
                                           ("1KB", "smaller than one expert"),
                                           ("-5GiB", "must be positive")])
def test_bad_budgets(tiny_dir, budget, match):
    expect(BudgetError, match, tiny_dir("mixtral"), expert_budget=budget)
