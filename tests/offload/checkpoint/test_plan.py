"""Every bad input ends in a typed error naming the file, tensor or option, and never touches the user's files."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

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


# -- hostile files: paths outside the folder, FIFOs, overlapping tensors, sizes that do not match, NaN ------------


def sharded_copy(tiny_dir, tmp_path) -> tuple[Path, Path, dict]:
    dst = tmp_path / "sharded"
    shutil.copytree(tiny_dir("mixtral", sharded=True), dst)
    index = dst / "model.safetensors.index.json"
    return dst, index, json.loads(index.read_text())


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/../../outside.safetensors", ""])
def test_an_index_naming_a_shard_outside_the_folder_is_refused(tiny_dir, tmp_path, name):
    dst, index, body = sharded_copy(tiny_dir, tmp_path)
    first = next(iter(body["weight_map"]))
    body["weight_map"][first] = name
    index.write_text(json.dumps(body))
    err = expect(CheckpointError, "names a shard", dst)
    assert "root:" not in str(err)                         # nothing of any file's content in the message


def test_shards_symlinked_as_the_hub_cache_does_load(tiny_dir, tmp_path):
    # models--org--name/snapshots/<rev>/model-0000x.safetensors -> ../../blobs/<hash>: the names the index
    # gives lie inside the snapshot folder; where their symlinks point is the cache's business
    src = tiny_dir("mixtral", sharded=True)
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        (blobs / hashlib.sha256(f.name.encode()).hexdigest()).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../..") / "blobs" / hashlib.sha256(f.name.encode()).hexdigest())
    plain = offload.from_pretrained(src, device="cpu")
    linked = offload.from_pretrained(snapshot, device="cpu")
    prompt = torch.tensor([[3, 9, 27, 4]])
    assert torch.equal(linked.generate(prompt, max_new_tokens=4), plain.generate(prompt, max_new_tokens=4))


@pytest.mark.parametrize("name", ["model.safetensors", "model.gguf"])
def test_a_fifo_named_like_the_weights_is_refused_without_blocking(broken, name):
    import os
    import threading

    (broken / "model.safetensors").unlink()
    os.mkfifo(broken / name)
    target = broken if name == "model.safetensors" else broken / name
    errors: list[BaseException] = []
    reader = threading.Thread(target=lambda: errors.append(pytest.raises(CheckpointError, offload.from_pretrained,
                                                                           target, device="cpu").value), daemon=True)
    reader.start()
    reader.join(60)                                        # a liveness bound: it used to block forever
    assert not reader.is_alive() and f"{name} is not a regular file" in str(errors[0])


@pytest.mark.parametrize("victim", ["model.layers.1.block_sparse_moe.experts.2.w1.weight",   # an expert: read by
                                    "model.layers.0.self_attn.q_proj.weight"])              # offset / by safetensors
def test_tensors_whose_bytes_overlap_are_refused(broken, victim):
    path = broken / "model.safetensors"
    _, header = header_of(path)
    begin, end = header[victim]["data_offsets"]
    neighbour = next(n for n, m in header.items() if n != "__metadata__" and m["data_offsets"][0] == end)
    size = end - begin
    header[neighbour]["data_offsets"] = [begin, begin + size]   # two tensors on the same bytes (same size
    header[neighbour]["shape"], header[neighbour]["dtype"] = header[victim]["shape"], header[victim]["dtype"]
    rewrite_header(path, header)
    expect(CheckpointError, "overlaps tensor|leaves a gap|belong to none", broken)


def test_a_header_error_never_echoes_the_files_bytes(broken):
    path = broken / "model.safetensors"
    secret = 0x4141414141414141                            # "AAAAAAAA" read as a header length
    path.write_bytes(struct.pack("<Q", secret) + path.read_bytes()[8:])
    err = expect(CheckpointError, "is not a safetensors file", broken)
    assert str(secret) not in str(err) and "AAAA" not in str(err)


def test_a_layer_count_beyond_the_weights_is_refused_before_it_costs_memory(broken):
    from tests.rss import peak_rss

    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_hidden_layers"] = 10_000_000                  # a 24-byte edit: 4+ GB and minutes before the check
    (broken / "config.json").write_text(json.dumps(cfg))
    with peak_rss() as rise:
        expect(CheckpointError, "num_hidden_layers=10000000 but the weights hold 3 layers", broken)
    assert rise[0] < 256, f"RSS rose {rise[0]:.0f} MiB"     # reading a tiny model: tens of MiB


def test_nan_in_a_resident_tensor_is_refused_by_name(broken):
    from safetensors.torch import load_file, save_file

    path = broken / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    expect(CheckpointError, "tensor 'model.layers.1.self_attn.o_proj.weight' in model.safetensors holds NaN", broken)


def test_nan_in_an_expert_is_an_error_at_the_step_not_silent_tokens(broken):
    from safetensors.torch import load_file, save_file

    from offload.errors import NumericError

    path = broken / "model.safetensors"
    tensors = load_file(path)
    for e in range(tensors["model.layers.0.block_sparse_moe.gate.weight"].shape[0]):  # every expert of layer 0
        tensors[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"][:] = float("inf")
    save_file(tensors, str(path), metadata={"format": "pt"})
    m = offload.from_pretrained(broken, device="cpu")     # experts are not read at load: it loads
    with pytest.raises(NumericError, match="NaN or Inf logits"):
        m.generate(torch.tensor([[3, 9, 27]]), max_new_tokens=3)


def test_a_predictor_file_beside_the_weights_is_not_a_weight_file():
    from offload.checkpoint.plan import plan_checkpoint

    plan = plan_checkpoint("tiny-moe")                     # ships predictor.safetensors beside model.safetensors
    assert {t.path.name for t in plan.tensors.values()} == {"model.safetensors"}
